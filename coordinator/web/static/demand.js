// heald coordinator: the demand page (#/demand). Forecast against actual, per site and for the fleet,
// from GET /api/demand (the same JSON as `heald fleet demand --json`; #/demand?hours=N&bucket=S). Uses app.js's el(), svg() and
// api(); app.js's router calls renderDemand().
"use strict";

function demandNum(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  return a >= 1e6 ? `${(v / 1e6).toFixed(2)}M` : a >= 1e3 ? `${(v / 1e3).toFixed(1)}k` : Number(v).toFixed(1);
}
function demandLast(series) { return series.length ? series[series.length - 1][1] : null; }
function demandPeak(fc) {
  if (!fc || !fc.point.length) return null;
  let i = 0;
  fc.point.forEach((v, j) => { if (v > fc.point[i]) i = j; });
  return { value: fc.point[i], t: fc.t[i] };
}

// One chart: actual (solid), predicted (dashed), the latest forecast (line and its lo..hi band).
function demandChart(r) {
  const W = 520, H = 140, pad = 26;
  const fc = r.forecast;
  const pts = [...r.actual, ...r.predicted];
  if (fc) fc.t.forEach((t, i) => pts.push([t, fc.lo[i]], [t, fc.hi[i]], [t, fc.point[i]]));
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": `${r.resource}: forecast and actual` });
  if (!pts.length) return s;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(0, ...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const x = (t) => pad + (x1 === x0 ? 0.5 : (t - x0) / (x1 - x0)) * (W - 2 * pad);
  const y = (v) => H - pad / 2 - (v - y0) / (y1 - y0) * (H - pad);
  const line = (series, cls) => s.append(svg("polyline", { class: cls, fill: "none",
    points: series.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") }));
  if (fc && fc.t.length) {
    const band = fc.t.map((t, i) => [t, fc.hi[i]]).concat(fc.t.map((t, i) => [t, fc.lo[i]]).reverse());
    s.append(svg("polygon", { class: "demand-band", fill: "#2459c7", "fill-opacity": "0.15", stroke: "none",
      points: band.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") }));
    line(fc.t.map((t, i) => [t, fc.point[i]]), "demand-forecast");
  }
  const dots = (series, cls) => series.forEach((p) => s.append(svg("circle", { class: cls, r: 2.5,
    cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1) })));
  if (r.predicted.length) { line(r.predicted, "demand-predicted"); dots(r.predicted, "demand-predicted-dot"); }
  if (r.actual.length) { line(r.actual, "demand-actual"); dots(r.actual, "demand-actual-dot"); }
  const label = (text, xx, yy, anchor) => { const t = svg("text", { x: xx, y: yy, "text-anchor": anchor || "start" }); t.textContent = text; s.append(t); };
  label(demandNum(y1), 2, pad / 2 + 4);
  label(demandNum(y0), 2, H - 4);
  return s;
}

function demandTable(id, resources) {
  return el("table", { id, class: "demand-table" },
    el("thead", {}, el("tr", {}, ["Resource", "Roll-up", "Actual (last)", "Predicted (last)", "Error", "Forecast peak", "Peak in"].map((h) => el("th", {}, h)))),
    el("tbody", {}, resources.map((r) => {
      const peak = demandPeak(r.forecast);
      const inS = peak ? Math.max(0, Math.round(peak.t - Date.now() / 1000)) : null;
      return el("tr", { "data-resource": r.resource },
        el("td", {}, r.resource), el("td", {}, r.agg),
        el("td", { class: "num", "data-col": "actual" }, demandNum(demandLast(r.actual))),
        el("td", { class: "num", "data-col": "predicted" }, demandNum(demandLast(r.predicted))),
        el("td", { class: "num", "data-col": "error_pct" }, r.error_pct === null ? "–" : `${r.error_pct.toFixed(1)}%`),
        el("td", { class: "num", "data-col": "peak" }, peak ? demandNum(peak.value) : "–"),
        el("td", { class: "num", "data-col": "peak_in" }, inS === null ? "–" : `${Math.round(inS / 60)} min`));
    })));
}

function demandScope(title, id, scope) {
  return el("section", { class: "demand-scope", id, "data-site": scope.site || "" },
    el("h2", {}, `${title} (${scope.nodes} node(s))`),
    scope.resources.length ? [
      demandTable(`${id}-table`, scope.resources),
      el("div", { class: "grid" }, scope.resources.map((r) => el("div", { class: "chart demand-chart", "data-resource": r.resource },
        el("h3", {}, `${r.resource} (${r.agg})`), demandChart(r)))),
    ] : el("p", { class: "muted" }, "no demand summaries yet"));
}

async function renderDemand(view) {
  // #/demand?hours=N&bucket=S (defaults 48 h, hourly buckets)
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const hours = parseInt(q.get("hours"), 10) || 48, bucket = parseInt(q.get("bucket"), 10) || 3600;
  const data = await api(`/api/demand?hours=${hours}&bucket_s=${bucket}`);
  view.replaceChildren(
    el("h1", {}, "Demand: forecast against actual"),
    el("p", { class: "muted", id: "demand-legend" },
      `Last ${data.hours} h in ${data.bucket_s >= 60 ? `${data.bucket_s / 60}-minute` : `${data.bucket_s}-second`} buckets. Solid: actual; dashed: what the previous summary's forecast said; ` +
      "blue: the latest forecast and its interval. Percentages are averaged over nodes, rates summed."),
    demandScope("Fleet", "demand-fleet", data.fleet),
    ...data.sites.map((s) => demandScope(`Site ${s.site}`, `demand-site-${s.site}`, s)));
}
