// postbox dashboard: polls the admin API every second and renders it.
// Plain DOM (textContent only: names come from users), canvas charts.
"use strict";

const POLL_MS = 1000;
let selected = null;
let purging = new Set();

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US");
const fmtRate = (r) => (r && r.rate !== undefined) ? (Math.round(r.rate * 10) / 10).toLocaleString("en-US") : "0";
const fmtAge = (ms) => {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return ms + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
  return Math.round(ms / 60000) + " min";
};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function token() {
  return $("token").value || sessionStorage.getItem("postbox-token") || "";
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  const t = token();
  // Sent with reads too: a server may protect them (AdminOptions::protect_reads).
  if (t) opts.headers["Authorization"] = "Bearer " + t;
  const response = await fetch(path, opts);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { reason: text }; }
  if (!response.ok) {
    const reason = body && body.reason ? body.reason : response.statusText;
    throw new Error(response.status + ": " + reason);
  }
  return body;
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderOverview(o) {
  $("backend").textContent = o.product_name + " " + o.product_version + " · " + o.backend;
  $("total-ready").textContent = fmt(o.queue_totals.messages_ready);
  $("total-unacked").textContent = fmt(o.queue_totals.messages_unacknowledged);
  $("rate-publish").textContent = fmtRate(o.message_stats.publish_details);
  $("rate-deliver").textContent = fmtRate(o.message_stats.deliver_get_details);
  $("rate-ack").textContent = fmtRate(o.message_stats.ack_details);
  $("count-queues").textContent = fmt(o.object_totals.queues);
  $("count-consumers").textContent = fmt(o.object_totals.consumers);
  $("count-alerts").textContent = fmt(o.alerts_firing);
  chart($("overview-chart"), o.history);
}

function renderQueues(queues) {
  const rows = queues.map((q) => {
    const tr = el("tr", { class: "queue" + (q.name === selected ? " selected" : ""), "data-queue": q.name });
    const purge = el("button", { class: "purge", type: "button", "data-queue": q.name }, "Purge");
    purge.addEventListener("click", (ev) => { ev.stopPropagation(); purgeQueue(q.name); });
    tr.append(
      el("td", { class: "name" }, q.name),
      el("td", { class: "state state-" + q.state }, q.state),
      el("td", { class: "n ready" }, fmt(q.messages_ready)),
      el("td", { class: "n unacked" }, fmt(q.messages_unacknowledged)),
      el("td", { class: "n consumers" }, fmt(q.consumers)),
      el("td", { class: "n" }, fmtRate(q.message_stats.publish_details)),
      el("td", { class: "n" }, fmtRate(q.message_stats.deliver_get_details)),
      el("td", { class: "n" }, fmtRate(q.message_stats.ack_details)),
      el("td", { class: "n age" }, fmtAge(q.head_message_age_ms)),
      el("td", { class: "n dead" }, fmt(q.dead_lettered)),
      el("td", {}, purge),
    );
    tr.addEventListener("click", () => {
      selected = q.name;
      history.replaceState(null, "", "#queue=" + encodeURIComponent(q.name));
      refreshDetail();
    });
    return tr;
  });
  replaceRows($("queues").tBodies[0], rows);
}

async function purgeQueue(name) {
  if (purging.has(name)) return;
  if (!window.confirm("Purge every ready message of queue \"" + name + "\"?")) return;
  purging.add(name);
  try {
    const r = await api("/api/queues/" + encodeURIComponent(name) + "/contents", { method: "DELETE" });
    setStatus("purged " + r.messages_purged + " from " + name, false);
  } catch (e) {
    setStatus("purge failed: " + e.message, true);
  } finally {
    purging.delete(name);
    poll();
  }
}

function renderAlerts(a) {
  const firing = a.firing.map((x) => el("li", { "data-queue": x.queue, "data-kind": x.kind }, describeAlert(x)));
  $("alerts").replaceChildren(...(firing.length ? firing : [el("li", { class: "none" }, "none firing")]));
  const log = a.recent.map((x) => el("li", {}, new Date(x.at_ms).toLocaleTimeString() + " " + (x.firing ? "fired: " : "cleared: ") + describeAlert(x)));
  $("alert-log").replaceChildren(...(log.length ? log : [el("li", { class: "none" }, "none yet")]));
}

function describeAlert(x) {
  switch (x.kind) {
    case "depth": return x.queue + ": " + fmt(x.ready) + " ready (threshold " + fmt(x.threshold) + ")";
    case "oldest_message": return x.queue + ": oldest message " + fmtAge(x.age_ms) + " (threshold " + fmtAge(x.threshold_ms) + ")";
    case "no_consumers": return x.queue + ": " + fmt(x.ready) + " ready and no consumers";
    case "crash_looping": return x.queue + ": consumers crashed " + x.crashes + " times within " + fmtAge(x.within_ms);
    case "publishers_blocked": return x.queue + ": publishers blocked for " + fmtAge(x.for_ms);
    default: return x.queue + ": " + x.kind;
  }
}

function renderConsumers(list) {
  const rows = list.map((c) => el("tr", { "data-queue": c.queue.name },
    el("td", {}, c.queue.name),
    el("td", {}, c.consumer_tag),
    el("td", {}, c.ack_required === null ? "–" : (c.ack_required ? "manual" : "auto")),
    el("td", { class: "n" }, fmt(c.prefetch_count)),
    el("td", { class: "n" }, fmt(c.unacked)),
    el("td", { class: "n" }, fmt(c.delivered)),
    el("td", { class: "status" + (c.crash_looping || c.activity_status === "restarting" ? " state-flow" : "") },
      c.activity_status + (c.crash_looping ? " · crash-looping" : "")),
    el("td", { class: "n" }, fmt(c.restarts)),
    el("td", { class: "failure" }, c.last_failure || ""),
  ));
  replaceRows($("consumers").tBodies[0], rows);
}

function renderCrashes(list) {
  const items = list.slice(0, 30).map((c) => el("li", {}, new Date(c.at_ms).toLocaleTimeString() + " " + c.queue + " consumer " + c.consumer + " (restart " + c.restarts + "): " + c.failure));
  $("crash-log").replaceChildren(...(items.length ? items : [el("li", { class: "none" }, "none")]));
}

function renderStreams(list) {
  const rows = list.map((s) => el("tr", { "data-stream": s.name },
    el("td", {}, s.name),
    el("td", { class: "n" }, fmt(s.messages)),
    el("td", { class: "n" }, fmt(s.bytes)),
    el("td", { class: "n" }, fmt(s.first_offset)),
    el("td", { class: "n" }, fmt(s.next_offset)),
    el("td", { class: "n" }, fmtRate(s.publish_details)),
    el("td", { class: "subscribers" }, s.subscribers.map((x) => (x.name || "anonymous") + " (" + fmt(x.lag) + ")").join(", ") || "none"),
  ));
  replaceRows($("streams").tBodies[0], rows);
}

function renderDeaths(d) {
  const targets = new Map(d.routes.map((r) => [r.queue, r]));
  const names = new Set([...Object.keys(d.by_queue), ...targets.keys()]);
  const rows = [...names].sort().map((q) => {
    const r = targets.get(q);
    const to = r ? (r.dead_letter_exchange === "" ? "default exchange" : "exchange " + r.dead_letter_exchange) + (r.dead_letter_routing_key ? " / " + r.dead_letter_routing_key : "") : "dropped (no dead-letter exchange)";
    const reasons = Object.entries(d.by_queue[q] || {}).map(([k, v]) => k + ": " + fmt(v)).join(", ") || "none yet";
    return el("tr", { "data-queue": q }, el("td", {}, q), el("td", {}, to), el("td", { class: "reasons" }, reasons));
  });
  replaceRows($("deaths").tBodies[0], rows);
  const log = d.recent.slice(0, 30).map((x) => el("li", {}, new Date(x.at_ms).toLocaleTimeString() + " " + x.queue + " " + x.reason + (x.routed ? "" : " (dropped)") + " " + x.message_id));
  $("death-log").replaceChildren(...(log.length ? log : [el("li", { class: "none" }, "none")]));
}

async function refreshDetail() {
  if (!selected) { $("detail").hidden = true; return; }
  try {
    const q = await api("/api/queues/" + encodeURIComponent(selected));
    $("detail").hidden = false;
    $("detail-name").textContent = q.name;
    $("detail-args").textContent = JSON.stringify(q.arguments, null, 2);
    const deaths = Object.entries(q.deaths).map(([k, v]) => el("li", {}, k + ": " + fmt(v)));
    $("detail-deaths").replaceChildren(...(deaths.length ? deaths : [el("li", { class: "none" }, "none")]));
    chart($("detail-chart"), q.history);
  } catch (e) {
    if (String(e.message).startsWith("404")) { selected = null; $("detail").hidden = true; }
  }
}

// Depth (left axis) and rates (right axis) over the history's samples.
function chart(canvas, points) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 24;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#e3e6ec";
  ctx.strokeRect(pad, 4, w - 2 * pad, h - pad);
  if (!points || points.length < 2) return;
  const t0 = points[0].at_ms, t1 = points[points.length - 1].at_ms || t0 + 1;
  const x = (t) => pad + (w - 2 * pad) * (t - t0) / Math.max(1, t1 - t0);
  const depthMax = Math.max(1, ...points.map((p) => Math.max(p.ready, p.unacked)));
  const rateMax = Math.max(1, ...points.map((p) => Math.max(p.publish_rate, p.deliver_rate)));
  const line = (color, value, max) => {
    ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
    points.forEach((p, i) => {
      const y = 4 + (h - pad) * (1 - value(p) / max);
      if (i === 0) ctx.moveTo(x(p.at_ms), y); else ctx.lineTo(x(p.at_ms), y);
    });
    ctx.stroke();
  };
  line("#2f6fdf", (p) => p.ready, depthMax);
  line("#e59b2b", (p) => p.unacked, depthMax);
  line("#2a8a4a", (p) => p.publish_rate, rateMax);
  line("#8a4fd0", (p) => p.deliver_rate, rateMax);
  ctx.fillStyle = "#6b7385"; ctx.font = "11px sans-serif";
  ctx.fillText(fmt(depthMax) + " msgs", pad + 4, 16);
  ctx.fillText(fmt(Math.round(rateMax)) + "/s", w - pad - 60, 16);
}

function setStatus(text, bad) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("bad", !!bad);
}

let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  try {
    const [o, q, c, s, a, d, cr] = await Promise.all([
      api("/api/overview"), api("/api/queues"), api("/api/consumers"), api("/api/streams"),
      api("/api/alerts"), api("/api/deaths"), api("/api/crashes"),
    ]);
    renderOverview(o); renderQueues(q); renderConsumers(c); renderStreams(s);
    renderAlerts(a); renderDeaths(d); renderCrashes(cr);
    await refreshDetail();
    setStatus("live · " + new Date().toLocaleTimeString(), false);
  } catch (e) {
    setStatus("cannot reach the server: " + e.message, true);
  } finally {
    polling = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  // A link to a queue's detail: #queue=<name>.
  if (location.hash.startsWith("#queue=")) selected = decodeURIComponent(location.hash.slice(7));
  const saved = sessionStorage.getItem("postbox-token");
  if (saved) $("token").value = saved;
  $("token").addEventListener("change", () => sessionStorage.setItem("postbox-token", $("token").value));
  $("publish-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!selected) return;
    try {
      const r = await api("/api/exchanges/amq.default/publish", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ routing_key: selected, payload: $("publish-payload").value }),
      });
      $("publish-result").textContent = r.routed ? "routed" : "not routed";
    } catch (e) { $("publish-result").textContent = e.message; }
    poll();
  });
  $("peek").addEventListener("click", async () => {
    if (!selected) return;
    try {
      const r = await api("/api/queues/" + encodeURIComponent(selected) + "/get", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ count: 5, ackmode: "ack_requeue_true" }),
      });
      $("peek-result").textContent = JSON.stringify(r, null, 2);
    } catch (e) { $("peek-result").textContent = e.message; }
  });
  poll();
  setInterval(poll, POLL_MS);
});
