// heald coordinator dashboard: plain JavaScript, no dependencies, no CDN.
// Views: #/ (fleet), #/node/<id>, #/escalations. Data comes from the JSON API; the
// Server-Sent Events stream (/api/stream) says what changed and the current view re-fetches it.
"use strict";

const state = { csrf: "", flashes: [], fleet: { site: "", label: "", q: "", status: "", sort: "risk", order: "desc", offset: 0, limit: 50 } };
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (opts.method && opts.method !== "GET") {
    opts.headers["X-CSRF-Token"] = state.csrf;
    opts.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, opts);
  if (res.status === 401) { location.href = "/login"; throw new Error("not logged in"); }
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  if (s < 86400) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}
function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : ""; }
function fmt(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits === undefined ? 2 : digits); }
function labelPills(labels) { return Object.entries(labels || {}).map(([k, v]) => el("span", { class: "pill" }, `${k}=${v}`)); }
function presence(online) { return el("span", { class: online ? "online" : "offline" }, online ? "online" : "offline"); }
function riskCell(n) {
  // an offline node's last risk is stale: greyed, never a current ALERT
  if (n.online === false) return el("span", { class: "stale", title: n.anomaly === null || n.anomaly === undefined ? "" : `last risk ${fmt(n.anomaly)}` },
    `stale since ${ago(n.last_seen)}`);
  if (n.anomaly === null || n.anomaly === undefined) return el("span", { class: "muted" }, n.cold ? "cold" : "–");
  return el("span", { class: n.alert ? "alert" : "" }, fmt(n.anomaly), n.alert ? " ALERT" : "");
}
function escalationCell(n) {
  if (!n.open_escalations) return "";
  return el("a", { href: "#/escalations", class: "escalation", title: when(n.escalation_ts) },
    el("b", {}, n.open_escalations), ` ${n.escalation || ""} · ${ago(n.escalation_ts)}`);
}
// human units from a metric's name (family before any [label]): bytes, %, seconds, rates
const IEC = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
function bytes(v) {
  let i = 0, x = Math.abs(v);
  while (x >= 1024 && i < IEC.length - 1) { x /= 1024; i += 1; }
  return `${v < 0 ? "-" : ""}${x.toFixed(x >= 100 || i === 0 ? 0 : 1)} ${IEC[i]}`;
}
function num(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return `${(v / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${(v / 1e3).toFixed(1)}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(a >= 100 ? 0 : 2);
}
function unitFormat(name) {
  const family = name.split("[")[0];
  if (/_bytes_per_s$/.test(family)) return (v) => `${bytes(v)}/s`;
  if (/_bytes$/.test(family)) return bytes;
  if (/(_pct|_percent|\.percent)$/.test(family)) return (v) => `${v.toFixed(Math.abs(v) >= 10 ? 0 : 1)}%`;
  if (/_ms$/.test(family)) return (v) => (Math.abs(v) >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${num(v)} ms`);
  if (/(_s|_seconds)$/.test(family) && !/_per_s$/.test(family)) return (v) => (Math.abs(v) >= 3600 ? `${(v / 3600).toFixed(1)} h` : Math.abs(v) >= 60 ? `${(v / 60).toFixed(1)} min` : `${num(v)} s`);
  if (/_per_s$/.test(family)) return (v) => `${num(v)}/s`;
  if (/_c$/.test(family)) return (v) => `${num(v)} °C`;
  if (/_w$/.test(family)) return (v) => `${num(v)} W`;
  if (/_mhz$/.test(family)) return (v) => `${num(v)} MHz`;
  return num;
}
// An operator's confirmation (or an action's error) is kept in state, not only in the DOM: every
// render replaces the view's children, and the live stream re-renders the page as soon as the
// action's own command, audit record or the node's ack land (a flash only prepended was gone
// within the 250 ms debounce, or at once when a live render was already in flight). Kept until
// the operator dismisses it or leaves the page; the newest first, five at most.
function paintFlashes(view) {
  for (const old of view.querySelectorAll(":scope > .flash")) old.remove();
  view.prepend(...state.flashes.map((f) => el("div", { class: "flash", role: "status" }, f.text, " ",
    el("button", { type: "button", class: "flash-dismiss", title: "dismiss", "aria-label": "dismiss", onclick: () => {
      state.flashes = state.flashes.filter((g) => g !== f);
      paintFlashes(document.getElementById("view"));
    } }, "\u00d7"))));
}
function flash(message) {
  state.flashes = [{ text: message }, ...state.flashes].slice(0, 5);
  paintFlashes(document.getElementById("view"));
}

// ------------------------------------------------------------------------------------ fleet
async function renderFleet(view) {
  const f = state.fleet;
  const params = new URLSearchParams({ sort: f.sort, order: f.order, offset: f.offset, limit: f.limit });
  if (f.site) params.set("site", f.site);
  if (f.label) params.set("label", f.label);
  if (f.q) params.set("q", f.q);
  if (f.status) params.set("state", f.status);
  const data = await api(`/api/nodes?${params}`);
  const refresh = () => { f.offset = 0; render(); };
  const siteSelect = el("select", { id: "filter-site", onchange: (e) => { f.site = e.target.value; refresh(); } },
    el("option", { value: "" }, "all sites"),
    data.sites.map((s) => el("option", { value: s, selected: s === f.site }, s)));
  const statusSelect = el("select", { id: "filter-state", onchange: (e) => { f.status = e.target.value; refresh(); } },
    ["", "online", "offline", "alert", "silenced"].map((s) => el("option", { value: s, selected: s === f.status }, s || "any state")));
  const label = el("input", { id: "filter-label", placeholder: "label key=value", value: f.label,
    onchange: (e) => { f.label = e.target.value.trim(); refresh(); } });
  const q = el("input", { id: "filter-q", placeholder: "search node / host", value: f.q,
    onchange: (e) => { f.q = e.target.value.trim(); refresh(); } });
  const cols = [["node", "Node"], ["site", "Site"], ["online", "State"], ["risk", "Risk"], [null, "Top contributors"],
    ["incidents", "Incidents"], [null, "Escalations"], [null, "Last action"], ["version", "Agent"], [null, "Labels"], ["last_seen", "Last seen"]];
  const head = el("tr", {}, cols.map(([key, title]) => {
    if (!key) return el("th", {}, title);
    const cls = "sortable" + (f.sort === key ? ` sorted-${f.order}` : "");
    return el("th", { class: cls, "data-sort": key, onclick: () => {
      if (f.sort === key) f.order = f.order === "desc" ? "asc" : "desc"; else { f.sort = key; f.order = key === "node" || key === "site" ? "asc" : "desc"; }
      refresh();
    } }, title);
  }));
  const rows = data.items.map((n) => el("tr", { id: `node-${n.node}`, "data-node": n.node },
    el("td", {}, el("a", { href: `#/node/${encodeURIComponent(n.node)}`, class: "node-link" }, n.node),
      n.hostname && n.hostname !== n.node ? el("div", { class: "muted" }, n.hostname) : null),
    el("td", {}, n.site),
    el("td", {}, presence(n.online), n.silenced_until > Date.now() / 1000 ? el("div", { class: "muted" }, "silenced") : null),
    el("td", { class: "risk" }, riskCell(n)),
    el("td", {}, (n.explanation || []).map((c) => el("div", {}, `${c.feature} ${Math.round(c.share * 100)}%`))),
    el("td", {}, n.open_incidents || ""),
    el("td", { class: "escalations" }, escalationCell(n)),
    el("td", { class: "last-action" }, n.last_action),
    el("td", {}, n.agent_version),
    el("td", {}, labelPills(n.labels)),
    el("td", { title: when(n.last_seen) }, ago(n.last_seen))));
  const pages = Math.max(1, Math.ceil(data.total / f.limit));
  const page = Math.floor(f.offset / f.limit) + 1;
  view.replaceChildren(
    el("h1", {}, "Fleet"),
    el("div", { class: "summary" },
      el("div", {}, el("b", { id: "count-nodes" }, data.fleet.nodes), "nodes"),
      el("div", {}, el("b", { id: "count-online", class: "online" }, data.fleet.online), "online"),
      el("div", {}, el("b", { class: "offline" }, data.fleet.nodes - data.fleet.online), "offline"),
      el("div", {}, el("b", { class: "alert" }, data.fleet.alert), "at risk"),
      el("a", { href: "#/escalations", class: "summary-link" }, el("b", { id: "count-escalations", class: data.fleet.escalations ? "alert" : "" }, data.fleet.escalations || 0), "open escalations")),
    el("div", { class: "filters" }, siteSelect, statusSelect, label, q, el("span", { class: "muted", id: "match-count" }, `${data.total} match`)),
    el("table", { id: "fleet" }, el("thead", {}, head), el("tbody", {}, rows)),
    el("div", { class: "pager" },
      el("button", { id: "prev", disabled: page <= 1, onclick: () => { f.offset = Math.max(0, f.offset - f.limit); render(); } }, "‹ prev"),
      `page ${page} of ${pages}`,
      el("button", { id: "next", disabled: page >= pages, onclick: () => { f.offset += f.limit; render(); } }, "next ›"),
      el("select", { onchange: (e) => { f.limit = Number(e.target.value); refresh(); } },
        [25, 50, 100, 250, 500].map((n) => el("option", { value: n, selected: n === f.limit }, `${n} / page`)))));
}

// ------------------------------------------------------------------------------------ charts
function lineChart(title, points, opts) {
  const o = Object.assign({ width: 320, height: 110, cls: "line", threshold: null, format: (v) => fmt(v) }, opts || {});
  const box = el("div", { class: "chart" }, el("h3", {}, title));
  const s = svg("svg", { viewBox: `0 0 ${o.width} ${o.height}`, preserveAspectRatio: "none", role: "img", "aria-label": title });
  const pts = points.filter((p) => p[1] !== null && p[1] !== undefined && Number.isFinite(p[1]));
  if (pts.length === 0) { box.append(el("div", { class: "muted" }, "no data")); return box; }
  const t0 = pts[0][0], t1 = pts[pts.length - 1][0] || t0 + 1;
  let lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  if (o.threshold !== null) { hi = Math.max(hi, o.threshold); lo = Math.min(lo, 0); }
  if (hi === lo) { hi += 1; lo -= lo === 0 ? 0 : 1; }
  const pad = 14;
  const x = (t) => pad + (o.width - 2 * pad) * ((t - t0) / Math.max(1e-9, t1 - t0));
  const y = (v) => o.height - pad - (o.height - 2 * pad) * ((v - lo) / (hi - lo));
  if (o.threshold !== null) s.append(svg("line", { x1: pad, x2: o.width - pad, y1: y(o.threshold), y2: y(o.threshold), class: "threshold" }));
  s.append(svg("polyline", { class: `line ${o.cls}`, points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") }));
  const label = (text, xx, yy, anchor) => { const t = svg("text", { x: xx, y: yy, "text-anchor": anchor || "start" }); t.textContent = text; s.append(t); };
  label(o.format(hi), 2, 10); label(o.format(lo), 2, o.height - 2);
  box.querySelector("h3").append(el("span", { class: "latest" }, ` ${o.format(pts[pts.length - 1][1])}`));
  label(new Date(t1 * 1000).toLocaleTimeString(), o.width - 2, o.height - 2, "end");
  box.append(s);
  return box;
}

function pickMetrics(names) {
  const preferred = ["cpu.util", "cpu.percent", "mem.used_pct", "memory.percent", "disk", "load", "net", "gpu"];
  const chosen = [];
  for (const p of preferred) for (const n of names) if (n.startsWith(p) && !chosen.includes(n) && chosen.length < 8) chosen.push(n);
  for (const n of names) if (!chosen.includes(n) && chosen.length < 8) chosen.push(n);
  return chosen;
}

// ------------------------------------------------------------------------------------ node
function approvalRows(items, showNode) {
  return items.map((a) => el("tr", { id: `approval-${a.id}`, "data-approval": a.id },
    showNode ? el("td", {}, el("a", { href: `#/node/${encodeURIComponent(a.node)}` }, a.node)) : null,
    el("td", {}, a.playbook), el("td", { class: "approval-target" }, a.target || el("span", { class: "muted" }, "not named")),
    el("td", {}, a.action), el("td", {}, a.message), el("td", {}, ago(a.requested_at)),
    el("td", { class: "approval-state" }, a.state === "pending"
      ? [el("button", { class: "approve", "data-id": a.id, onclick: () => decide(a.id, "approve") }, "Approve"), " ",
        el("button", { class: "deny", "data-id": a.id, onclick: () => decide(a.id, "deny") }, "Deny")]
      : `${a.state} by ${a.decided_by}`)));
}

async function decide(id, verb) {
  try {
    await api(`/api/approvals/${encodeURIComponent(id)}/${verb}`, { method: "POST", body: "{}" });
    await render();
    flash(`${verb === "approve" ? "Approved" : "Denied"} ${id}; signed command sent.`);
  } catch (e) { flash(`Could not ${verb}: ${e.message}`); }
}

function actionsTable(actions) {
  return el("table", { id: "actions" },
    el("thead", {}, el("tr", {}, ["When", "Playbook", "Step", "Action", "Phase", "Outcome", "Duration", "Error"].map((h) => el("th", {}, h)))),
    el("tbody", {}, actions.map((a) => el("tr", { "data-run": a.run_id, "data-phase": a.phase },
      el("td", { title: when(a.ts) }, ago(a.ts)), el("td", {}, a.playbook), el("td", {}, a.step),
      el("td", {}, a.action, a.dry_run ? el("span", { class: "muted" }, " (dry-run)") : null,
        a.result && a.result.by ? el("span", { class: "muted" }, ` by ${a.result.by}`) : null), el("td", {}, a.phase),
      el("td", { class: `outcome ${a.outcome || ""}` }, a.outcome || ""),
      el("td", {}, a.duration_s === null || a.duration_s === undefined ? "" : `${fmt(a.duration_s, 1)}s`),
      el("td", {}, a.error)))));
}

// the node's answer to a command: its final ack (done, failed, rejected, expired), or none in 15 s
async function answerOf(node, id, playbook) {
  const deadline = Date.now() + 15000;
  while (Date.now() < deadline) {
    const rows = await api(`/api/nodes/${encodeURIComponent(node)}/commands?limit=50`);
    const c = rows.items.find((r) => r.id === id);
    if (c && c.status === "done") return `${node} started ${playbook}.`;
    if (c && ["failed", "rejected", "expired"].includes(c.status)) return `${node} did not run ${playbook}: ${c.status}${c.status_message ? `: ${c.status_message}` : ""}`;
    await new Promise((r) => setTimeout(r, 500));
  }
  return `No answer from ${node} yet; it runs ${playbook} if it gets the command before it expires.`;
}

async function renderNode(view, node) {
  const since = Date.now() / 1000 - 3600;
  const [n, metrics, risk] = await Promise.all([
    api(`/api/nodes/${encodeURIComponent(node)}`),
    api(`/api/nodes/${encodeURIComponent(node)}/metrics?since=${since - 2700}`),
    api(`/api/nodes/${encodeURIComponent(node)}/risk?since=${since}`)]);
  const charts = el("div", { class: "grid", id: "charts" },
    lineChart("risk (anomaly score; 1.0 = alert)", risk.map((r) => [r.ts, r.anomaly]), { cls: "risk", threshold: 1.0 }),
    pickMetrics(metrics.names).map((name) => lineChart(name, metrics.samples.map((s) => [s[0], s[1][name]]), { format: unitFormat(name) })));
  const pending = n.approvals.filter((a) => a.state === "pending");
  const runForm = el("form", { class: "inline-form", id: "run-form", onsubmit: async (e) => {
    e.preventDefault();
    const pb = e.target.elements.playbook.value.trim();
    try {
      const sent = await api(`/api/nodes/${encodeURIComponent(node)}/run`, { method: "POST", body: JSON.stringify({ playbook: pb }) });
      // kept in state (not a flash): the live stream re-renders the page while the node answers
      state.runAnswer = { node, text: `Asked ${node} to run ${pb}; waiting for its answer…` };
      document.getElementById("run-answer").textContent = state.runAnswer.text;
      state.runAnswer = { node, text: await answerOf(node, sent.command_id, pb) };
      const shown = document.getElementById("run-answer");
      if (shown) shown.textContent = state.runAnswer.text;
    } catch (err) { flash(err.message); }
  } }, el("input", { name: "playbook", placeholder: "playbook", required: true }), el("button", { type: "submit" }, "Run playbook"));
  const silenceForm = el("form", { class: "inline-form", id: "silence-form", onsubmit: async (e) => {
    e.preventDefault();
    const minutes = Number(e.target.elements.minutes.value);
    try { await api(`/api/nodes/${encodeURIComponent(node)}/silence`, { method: "POST", body: JSON.stringify({ duration_s: minutes * 60 }) }); await render(); } catch (err) { flash(err.message); }
  } }, el("input", { name: "minutes", type: "number", min: 1, value: 60, size: 5 }), el("button", { type: "submit" }, "Silence (min)"));
  const silenced = n.silenced_until > Date.now() / 1000;
  // lifts the silence at once (the node's automatic playbook runs resume); only while one holds
  const unsilenceButton = silenced ? el("button", { type: "button", id: "unsilence", class: "unsilence", onclick: async () => {
    try { await api(`/api/nodes/${encodeURIComponent(node)}/unsilence`, { method: "POST", body: "{}" }); await render(); flash(`Lifted the silence on ${node}; signed command sent.`); } catch (err) { flash(err.message); }
  } }, "Unsilence") : null;
  view.replaceChildren(
    el("h1", {}, el("a", { href: "#/" }, "Fleet"), " / ", el("span", { id: "node-name" }, n.node), " ", presence(n.online)),
    el("dl", { class: "kv", id: "node-info" },
      el("dt", {}, "Site"), el("dd", { id: "node-site" }, n.site, n.pending_site ? el("span", { class: "warn" }, ` · claims ${n.pending_site} `,
        el("button", { type: "button", id: "accept-site", onclick: async () => {
          try { await api(`/api/nodes/${encodeURIComponent(node)}/site`, { method: "POST", body: JSON.stringify({ site: n.pending_site }) }); await render(); flash(`Moved ${node} to ${n.pending_site}.`); } catch (err) { flash(err.message); }
        } }, "Move it there")) : ""),
      el("dt", {}, "Host"), el("dd", {}, n.hostname || "–"),
      el("dt", {}, "Agent / model"), el("dd", {}, `${n.agent_version || "?"} / ${n.model_version || "?"}`),
      el("dt", {}, "Labels"), el("dd", {}, labelPills(n.labels)),
      el("dt", {}, "Last seen"), el("dd", {}, `${ago(n.last_seen)} (${when(n.last_seen)})`),
      el("dt", {}, "Status"), el("dd", {}, n.status_reason || (n.online ? "online" : "offline"), n.spool_pending ? ` · ${n.spool_pending} spooled` : ""),
      el("dt", {}, "Data lost"), el("dd", { id: "node-data-lost" }, `${n.metric_gaps || 0} samples missing · ${n.dropped_metrics || 0} metric batches dropped by the node · ${n.quarantined || 0} reports quarantined`),
      el("dt", {}, "Risk"), el("dd", { id: "node-risk" }, riskCell(n)),
      el("dt", {}, "Top contributors"), el("dd", {}, (n.explanation || []).map((c) => el("div", {}, el("span", { class: "bar", style: null, "data-w": c.share }), `${c.feature} ${Math.round(c.share * 100)}%`))),
      el("dt", {}, "Failure classes"), el("dd", {}, Object.entries(n.failure || {}).map(([k, v]) => el("span", { class: "pill" }, `${k} ${Math.round(v * 100)}%`))),
      el("dt", {}, "Open incidents"), el("dd", {}, n.open_incidents || 0),
      el("dt", {}, "Open escalations"), el("dd", { id: "node-escalations" }, (() => {
        const open = (n.escalations || []).filter((e) => e.state === "open");
        return open.length ? el("a", { href: "#/escalations", class: "escalation" }, el("b", {}, open.length), ` ${open[0].reason} · ${ago(open[0].ts)}`) : "0";
      })()),
      el("dt", {}, "Last action"), el("dd", { id: "node-last-action" }, n.last_action || "–"),
      el("dt", {}, "Silenced until"), el("dd", { id: "node-silenced" }, silenced ? when(n.silenced_until) : "–")),
    el("div", { style: null }, el("h2", {}, "Operate"), runForm, silenceForm, unsilenceButton,
      el("div", { id: "run-answer", class: "muted" }, state.runAnswer && state.runAnswer.node === node ? state.runAnswer.text : "")),
    el("h2", {}, "Pending approvals"),
    pending.length ? el("table", { id: "node-approvals" },
      el("thead", {}, el("tr", {}, ["Playbook", "Target", "Action", "Why", "Asked", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, approvalRows(pending, false))) : el("p", { class: "muted" }, "none"),
    el("h2", {}, "Risk and metrics"), charts,
    el("h2", {}, "Forecasts"),
    (n.forecasts || []).length ? el("table", { id: "forecasts" }, el("thead", {}, el("tr", {}, ["Resource", "ETA", "Confidence", "Rate/s"].map((h) => el("th", {}, h)))),
      el("tbody", {}, n.forecasts.map((f) => el("tr", {}, el("td", {}, f.resource), el("td", {}, f.eta_s === null ? "–" : `${Math.round(f.eta_s / 60)} min`),
        el("td", {}, `${Math.round(f.confidence * 100)}%`), el("td", {}, fmt(f.rate_per_s, 4)))))) : el("p", { class: "muted" }, "none"),
    el("h2", {}, "Actions"), actionsTable(n.actions),
    el("h2", {}, "Events"),
    el("table", { id: "events" }, el("tbody", {}, n.events.map((e) => el("tr", {}, el("td", { title: when(e.wall) }, ago(e.wall)), el("td", {}, e.name), el("td", {}, e.source), el("td", {}, e.message))))),
    el("h2", {}, "Commands"),
    el("table", { id: "commands" }, el("tbody", {}, n.commands.map((c) => el("tr", {}, el("td", {}, ago(c.issued_at)), el("td", {}, c.name), el("td", {}, JSON.stringify(c.args)), el("td", {}, c.actor), el("td", { class: "command-status" }, c.status, c.status_message ? `: ${c.status_message}` : ""))))),
    el("h2", {}, "Audit"),
    el("table", { id: "audit" }, el("tbody", {}, n.audit.map((a) => el("tr", {}, el("td", {}, when(a.ts)), el("td", {}, a.actor), el("td", {}, a.action), el("td", {}, JSON.stringify(a.detail)))))));
  for (const bar of view.querySelectorAll(".bar[data-w]")) bar.style.width = `${Math.round(Number(bar.dataset.w) * 120)}px`;
}

// ------------------------------------------------------------------------------------ escalations
async function renderEscalations(view) {
  const [approvals, escalations, leases] = await Promise.all([api("/api/approvals"), api("/api/escalations"), api("/api/leases")]);
  view.replaceChildren(
    el("h1", {}, "Escalations and approvals"),
    el("h2", {}, "Pending approvals"),
    approvals.items.length ? el("table", { id: "approvals" },
      el("thead", {}, el("tr", {}, ["Node", "Playbook", "Target", "Action", "Why", "Asked", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, approvalRows(approvals.items, true))) : el("p", { class: "muted", id: "no-approvals" }, "none"),
    el("h2", {}, "Open escalations"),
    escalations.items.length ? el("table", { id: "escalations" },
      el("thead", {}, el("tr", {}, ["#", "Scope", "Node / group", "Playbook", "Reason", "Raised", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, escalations.items.map((e) => el("tr", { "data-escalation": e.id, class: `scope-${e.scope}` },
        el("td", {}, e.id), el("td", {}, e.scope), el("td", {}, e.scope === "fleet" ? `${e.grp} (${e.nodes.length} nodes)` : e.node),
        el("td", {}, e.playbook), el("td", {}, e.reason), el("td", {}, ago(e.ts)),
        el("td", {}, el("button", { onclick: async () => { await api(`/api/escalations/${e.id}/resolve`, { method: "POST", body: "{}" }); render(); } }, "Resolve")))))) : el("p", { class: "muted" }, "none"),
    el("h2", {}, "Active leases"),
    leases.items.length ? el("table", { id: "leases" }, el("tbody", {}, leases.items.map((l) => el("tr", {},
      el("td", {}, l.node), el("td", {}, l.grp), el("td", {}, l.playbook), el("td", {}, `expires ${when(l.expires_at)}`))))) : el("p", { class: "muted" }, "none"));
}

// ------------------------------------------------------------------------------------ router + live
let rendering = null, again = false;
async function render() {
  if (rendering) { again = true; return rendering; }
  const view = document.getElementById("view");
  const hash = location.hash || "#/";
  rendering = (async () => {
    try {
      if (hash.startsWith("#/node/")) await renderNode(view, decodeURIComponent(hash.slice(7)));
      else if (hash.startsWith("#/escalations")) await renderEscalations(view);
      else if (hash.startsWith("#/cost")) await renderCost(view);
      else if (hash.startsWith("#/demand")) await renderDemand(view);
      else await renderFleet(view);
      paintFlashes(view);
      document.body.dataset.view = hash.split("/")[1] || "fleet";
      document.body.dataset.rendered = String(Date.now());
    } catch (e) { view.replaceChildren(el("p", { class: "error" }, e.message)); paintFlashes(view); }
    try {
      const a = await api("/api/approvals?limit=1000");
      document.getElementById("pending-count").textContent = a.items.length ? String(a.items.length) : "";
    } catch (e) { /* header badge only */ }
  })();
  await rendering;
  rendering = null;
  if (again) { again = false; await render(); }
}

function connectStream() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/stream");
  let timer = null;
  source.addEventListener("hello", () => { live.className = "live on"; });
  source.addEventListener("change", (ev) => {
    live.className = "live on";
    const change = JSON.parse(ev.data);
    const hash = location.hash || "#/";
    let relevant = true;
    if (hash.startsWith("#/node/")) {
      const node = decodeURIComponent(hash.slice(7));
      relevant = change.what.some((w) => w !== "nodes") || change.nodes.includes(node);
    }
    if (relevant && !timer) timer = setTimeout(() => { timer = null; render(); }, 250);
  });
  source.onerror = () => { live.className = "live off"; };
}

async function main() {
  const session = await api("/api/session");
  state.csrf = session.csrf || "";
  document.getElementById("logout-csrf").value = state.csrf;
  window.addEventListener("hashchange", () => { state.flashes = []; render(); });
  await render();
  connectStream();
}

document.addEventListener("DOMContentLoaded", main);
