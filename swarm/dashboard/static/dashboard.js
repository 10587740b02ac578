// The swarmlm dashboard: polls swarm.json, draws each model's blocks, peers and load, and
// runs the chat box against the OpenAI-compatible API when the page is served by `swarm api`.
// Everything in swarm.json comes from DHT records anyone may write: it is only ever set as
// text (textContent, attributes), never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const RATE_WINDOW_S = 30; // tokens/s over this much history: peers refresh their counters every ~10 s

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const fmt = (x, digits = 1) => Number(x).toLocaleString(undefined, { maximumFractionDigits: digits });
const spans = (gaps) => gaps.map(([s, e]) => (e - s === 1 ? `${s}` : `${s}\u2013${e - 1}`)).join(", ");
const shortId = (id) => (id.length > 10 ? `\u2026${id.slice(-8)}` : id); // libp2p ids all begin 12D3KooW

// --- one model ------------------------------------------------------------------------

function blockMap(model) {
  const map = h("div", { class: "map", style: { gridTemplateColumns: `repeat(${model.num_blocks}, 1fr)` } });
  for (const block of model.blocks) {
    const kind = block.replicas === 0 ? "gap" : `covered r${Math.min(block.replicas, 3)}`;
    const who = block.peers.length ? block.peers.map(shortId).join(", ") : "nobody";
    map.append(h("div", { class: `block ${kind}`, "data-index": block.index, "data-replicas": block.replicas,
                          title: `block ${block.index}: ${block.replicas} online replica(s); served by ${who}` },
                 String(block.index)));
  }
  return map;
}

function peerLanes(model) {
  const lanes = h("div", { class: "lanes" });
  for (const peer of model.peers) {
    const left = (100 * peer.start) / model.num_blocks, width = (100 * (peer.end - peer.start)) / model.num_blocks;
    lanes.append(h("div", { class: "lane" },
      h("div", { class: `bar ${peer.state}`, style: { left: `${left}%`, width: `${width}%` },
                 title: `${peer.peer_id} ${peer.endpoint} blocks ${peer.start}:${peer.end} (${peer.state})` },
        `${shortId(peer.peer_id)} ${peer.start}:${peer.end}`)));
  }
  return lanes;
}

function reach(peer) {
  if (peer.reach !== "relayed") return "direct";
  return "relayed via " + peer.relays.map((m) => m.split("/")[2]).join(", ");
}

function peerTable(model) {
  const columns = ["peer", "address", "blocks", "state", "throughput (tok/s)", "free cache tokens", "dtype",
                   "quant", "version", "reach", "sessions"];
  const body = h("tbody");
  for (const p of model.peers) {
    const cells = [[shortId(p.peer_id), ""], [p.endpoint, ""], [`${p.start}:${p.end}`, ""], [p.state, ""],
                   [fmt(p.throughput), "num"], [fmt(p.cache_tokens_free, 0), "num"], [p.dtype, ""], [p.quant, ""],
                   [p.version, ""], [reach(p), ""], [fmt(p.sessions, 0), "num"]];
    body.append(h("tr", { class: "peer", "data-peer-id": p.peer_id, title: p.peer_id },
                  ...cells.map(([text, cls]) => h("td", cls ? { class: cls } : {}, text))));
  }
  return h("table", { class: "peers" }, h("thead", {}, h("tr", {}, ...columns.map((c) => h("th", {}, c)))), body);
}

// history: [[time s, live sessions, tokens so far], ...] -> [[time s, sessions, tokens/s], ...]
function rates(history) {
  let j = 0;
  return history.map(([t, sessions, tokens]) => {
    while (j < history.length - 1 && t - history[j][0] > RATE_WINDOW_S) j++;
    const [t0, , tokens0] = history[j];
    return [t, sessions, t > t0 ? Math.max(0, tokens - tokens0) / (t - t0) : 0];
  });
}

function drawPlot(canvas, history, now) {
  const ratio = window.devicePixelRatio || 1, width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  const pad = { l: 40, r: 56, t: 18, b: 18 }, w = width - pad.l - pad.r, ht = height - pad.t - pad.b;
  // The last 10 minutes, or since the dashboard started (at least a minute).
  const points = rates(history), span = Math.min(600, Math.max(60, now - (history.length ? history[0][0] : now)));
  const t0 = now - span;
  const maxSessions = Math.max(1, ...points.map((p) => p[1])), maxRate = Math.max(1, ...points.map((p) => p[2]));
  const x = (t) => pad.l + (w * (t - t0)) / span;
  g.font = "11px system-ui, sans-serif";
  g.strokeStyle = "#dee2e6"; g.strokeRect(pad.l, pad.t, w, ht);
  g.fillStyle = "#6c757d";
  g.fillText(span >= 120 ? `\u2212${Math.round(span / 60)} min` : `\u2212${Math.round(span)} s`, pad.l, height - 4);
  g.fillText("now", pad.l + w - 18, height - 4);
  const series = [[1, maxSessions, "#1d3557", pad.l - 36], [2, maxRate, "#e76f51", pad.l + w + 4]];
  for (const [index, max, colour, labelX] of series) {
    g.strokeStyle = colour; g.lineWidth = 2; g.beginPath();
    points.forEach((p, i) => {
      const y = pad.t + ht - (ht * p[index]) / max;
      if (i === 0) g.moveTo(x(p[0]), y); else g.lineTo(x(p[0]), y);
    });
    g.stroke();
    g.fillStyle = colour;
    g.fillText(fmt(max), labelX, pad.t + 10); g.fillText("0", labelX, pad.t + ht);
  }
  const last = points.length ? points[points.length - 1] : [now, 0, 0];
  g.fillStyle = "#1d3557"; g.fillText(`live sessions ${fmt(last[1], 0)}`, pad.l + 6, 12);
  g.fillStyle = "#e76f51"; g.fillText(`tokens/s ${fmt(last[2])}`, pad.l + 130, 12);
}

function modelCard(model, now) {
  const gapText = model.gaps.length ? h("span", { class: "bad" }, ` \u00b7 uncovered: ${spans(model.gaps)}`) : "";
  const canvas = h("canvas", { class: "plot" });
  const card = h("section", { class: "card model", "data-model-id": model.model_id },
    h("h2", {}, `${model.model_name} `, h("small", {}, `${model.model_id} \u00b7 ${model.num_blocks} blocks`)),
    h("p", { class: "summary" }, h("b", { class: "covered-count" }, String(model.covered)),
      ` / ${model.num_blocks} blocks covered \u00b7 `, h("b", { class: "peer-count" }, String(model.peers.length)),
      " peers", gapText),
    blockMap(model), peerLanes(model), peerTable(model), canvas);
  requestAnimationFrame(() => drawPlot(canvas, model.history, now));
  return card;
}

// --- polling --------------------------------------------------------------------------

const status = document.getElementById("status");

async function poll() {
  try {
    const response = await fetch("swarm.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`swarm.json: HTTP ${response.status}`);
    const snapshot = await response.json();
    const models = document.getElementById("models");
    if (snapshot.time !== null) {
      models.replaceChildren(...(snapshot.models.length ? snapshot.models.map((m) => modelCard(m, snapshot.time))
        : [h("p", { class: "card" }, "No model in the swarm: no peer announces one.")]));
    }
    status.className = snapshot.error ? "error" : "";
    status.textContent = snapshot.error || (snapshot.time === null ? "looking at the swarm\u2026"
      : `updated ${new Date(snapshot.time * 1000).toLocaleTimeString()} \u00b7 ${snapshot.models.length} model(s)`);
    setChat(snapshot.chat, snapshot.models);
  } catch (error) {
    status.className = "error";
    status.textContent = `cannot reach the dashboard: ${error.message}`;
  }
  setTimeout(poll, POLL_MS);
}

// --- chat -----------------------------------------------------------------------------

const chat = { enabled: null, model: null, busy: false, messages: [] };
const input = document.getElementById("chat-input"), send = document.getElementById("chat-send");
const transcript = document.getElementById("transcript");

function setChat(state, models) {
  if (!chat.model && models.length) chat.model = models[0].model_name;
  if (chat.enabled === state.enabled) return;
  chat.enabled = state.enabled;
  const off = document.getElementById("chat-off");
  off.hidden = state.enabled;
  off.textContent = state.reason || "";
  input.disabled = send.disabled = !state.enabled;
  if (state.enabled) {
    fetch("v1/models").then((r) => r.json()).then((list) => {
      if (list.data && list.data.length) chat.model = list.data[0].id;
    }).catch(() => {});
  }
}

async function streamAnswer(bubble) {
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: chat.model, messages: chat.messages, stream: true,
                           max_tokens: Number(document.getElementById("chat-max").value) || 128 }),
  });
  if (!response.ok) {
    const text = await response.text();
    let message = text;
    try { message = JSON.parse(text).error.message || text; } catch (_) { /* not JSON: show as is */ }
    throw new Error(`HTTP ${response.status}: ${message}`);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", answer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the stream ended without data: [DONE]");
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue; // SSE comments, event names, blank separators
      const data = line.slice(5).trim();
      if (data === "[DONE]") return answer;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        bubble.textContent = answer;
        transcript.scrollTop = transcript.scrollHeight;
      }
    }
  }
}

document.getElementById("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!chat.enabled || chat.busy || !text) return;
  chat.busy = true; send.disabled = true; input.value = "";
  chat.messages.push({ role: "user", content: text });
  transcript.append(h("div", { class: "msg user" }, text));
  const bubble = h("div", { class: "msg assistant" }, "\u2026");
  transcript.append(bubble);
  try {
    const answer = await streamAnswer(bubble);
    chat.messages.push({ role: "assistant", content: answer });
    bubble.classList.add("done");
  } catch (error) {
    chat.messages.pop();
    bubble.classList.add("failed");
    bubble.textContent = `failed: ${error.message}`;
  }
  chat.busy = false; send.disabled = false;
});

poll();
