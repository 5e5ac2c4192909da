// A line chart in SVG: the effective curve of one metric key across attempts (solid), and the steps a
// resume rolled back (dashed, per attempt), so a restart shows where the run went back to.

import { h, s } from "./util.js";

const WIDTH = 760, HEIGHT = 280, M = { l: 64, r: 16, t: 12, b: 34 };

function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * mag).find((x) => x >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function label(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return Number(v.toPrecision(3)).toExponential();
  return String(Number(v.toPrecision(4)));
}

function path(points, x, y) {
  let d = "";
  let pen = false;
  for (const p of points) {
    if (p.value === null || !Number.isFinite(p.value)) { pen = false; continue; }
    d += `${pen ? "L" : "M"}${x(p.step).toFixed(1)},${y(p.value).toFixed(1)}`;
    pen = true;
  }
  return d;
}

// curve: [{step, value}]; rolled: [{number, points: [{step, value}]}]
export function lineChart(key, curve, rolled, { downsampled = false } = {}) {
  const all = [...curve, ...rolled.flatMap((r) => r.points)].filter((p) => p.value !== null && Number.isFinite(p.value));
  const box = h("figure", { class: "chart", "data-key": key, "data-points": curve.length });
  box.append(h("figcaption", {}, h("strong", {}, key), downsampled ? h("span", { class: "muted" }, " (downsampled)") : null));
  if (all.length === 0) {
    box.append(h("p", { class: "muted" }, "No points yet."));
    return box;
  }
  let x0 = Math.min(...all.map((p) => p.step)), x1 = Math.max(...all.map((p) => p.step));
  let y0 = Math.min(...all.map((p) => p.value)), y1 = Math.max(...all.map((p) => p.value));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const iw = WIDTH - M.l - M.r, ih = HEIGHT - M.t - M.b;
  const x = (v) => M.l + ((v - x0) / (x1 - x0)) * iw;
  const y = (v) => M.t + (1 - (v - y0) / (y1 - y0)) * ih;
  const svg = s("svg", { width: WIDTH, height: HEIGHT, viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": `${key} by step, ${curve.length} points` });
  for (const t of ticks(y0, y1)) {
    svg.append(s("line", { class: "grid", x1: M.l, x2: WIDTH - M.r, y1: y(t), y2: y(t) }),
      s("text", { x: M.l - 6, y: y(t) + 4, "text-anchor": "end" }, label(t)));
  }
  for (const t of ticks(x0, x1).filter((t) => Number.isInteger(t))) {
    svg.append(s("text", { x: x(t), y: HEIGHT - M.b + 16, "text-anchor": "middle" }, String(t)));
  }
  svg.append(s("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: HEIGHT - M.b }),
    s("line", { class: "axis", x1: M.l, x2: WIDTH - M.r, y1: HEIGHT - M.b, y2: HEIGHT - M.b }),
    s("text", { x: WIDTH - M.r, y: HEIGHT - 4, "text-anchor": "end" }, "step"));
  for (const r of rolled) {
    if (r.points.length) svg.append(s("path", { class: "rolled", d: path(r.points, x, y), "data-attempt": r.number }, s("title", {}, `attempt ${r.number}: rolled back`)));
  }
  svg.append(s("path", { class: "curve", d: path(curve, x, y) }));
  const last = curve[curve.length - 1];
  if (last && last.value !== null) svg.append(s("circle", { cx: x(last.step), cy: y(last.value), r: 3, fill: "#1f4e8c" }, s("title", {}, `step ${last.step}: ${last.value}`)));
  box.append(svg, h("div", { class: "legend" },
    h("span", {}, h("span", { class: "sw", style: "background:#1f4e8c" }), "effective curve", last ? ` (last: step ${last.step} = ${label(last.value)})` : ""),
    rolled.some((r) => r.points.length) ? h("span", {}, h("span", { class: "sw", style: "background:#a0522d" }), "rolled back by a resume") : null));
  return box;
}
