// heald coordinator: the cost page (#/cost). What the fleet's resources idled: per day, this week,
// the top wasters and the trend, from GET /api/cost (the same JSON as `heald fleet cost --json`).
// Uses app.js's el() and api(); app.js's router calls renderCost().
"use strict";

function costNum(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits === undefined ? 6 : digits); }
function costTrend(v) {
  if (v === null || v === undefined) return el("span", { class: "muted" }, "–");
  const pct = Math.round(v * 100);
  return el("span", { class: pct > 0 ? "alert" : "" }, `${pct > 0 ? "+" : ""}${pct}%`);
}
const COST_COLUMNS = [
  ["idle_core_h", "Idle core-h"], ["idle_gpu_h", "Idle GPU-h"], ["gpu_mem_idle_gib_h", "Idle GPU mem GiB-h"],
  ["mem_stranded_gib_h", "Stranded mem GiB-h"], ["energy_kwh", "Energy kWh"], ["money", "Money"],
];
function costCells(row, cls) { return COST_COLUMNS.map(([k]) => el("td", { class: `num ${k}`, "data-col": k }, costNum(row[k], k === "money" ? 4 : 6))); }
function costHead(first) { return el("thead", {}, el("tr", {}, [first, ...COST_COLUMNS.map(([, h]) => h)].map((h) => el("th", {}, h)))); }

async function renderCost(view) {
  const data = await api("/api/cost?days=14&top=10");
  const money = data.currency ? ` (money in ${data.currency})` : " (no prices set: resource-hours)";
  view.replaceChildren(
    el("h1", {}, "Fleet cost: idle capacity"),
    el("p", { class: "muted", id: "cost-nodes" }, `${data.nodes} node(s) reported this week${money}`),
    el("table", { id: "cost-summary" }, costHead("Period"), el("tbody", {},
      el("tr", { "data-period": "today" }, el("td", {}, "Today"), costCells(data.today)),
      el("tr", { "data-period": "week" }, el("td", {}, "Last 7 days"), costCells(data.week)),
      el("tr", { "data-period": "previous_week" }, el("td", {}, "7 days before"), costCells(data.previous_week)),
      el("tr", { "data-period": "trend" }, el("td", {}, "Trend"), COST_COLUMNS.map(([k]) => el("td", { class: "num" }, costTrend(data.trend[k])))))),
    el("h2", {}, "Top wasters (last 7 days)"),
    data.top.length ? el("table", { id: "cost-top" }, costHead("Node"), el("tbody", {},
      data.top.map((n) => el("tr", { "data-node": n.node }, el("td", {}, el("a", { href: `#/node/${encodeURIComponent(n.node)}` }, n.node), " ",
        el("span", { class: "pill" }, n.node_class)), costCells(n))))) : el("p", { class: "muted", id: "no-cost" }, "no cost summaries yet"),
    el("h2", {}, "Per day"),
    el("table", { id: "cost-days" }, costHead("Day"), el("tbody", {},
      data.days.map((d) => el("tr", { "data-day": d.day }, el("td", {}, new Date(d.day * 1000).toISOString().slice(0, 10)), costCells(d))))));
}
