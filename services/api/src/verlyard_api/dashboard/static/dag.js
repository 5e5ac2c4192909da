// The pipeline's DAG as SVG: stages in columns by depth (longest path from a root), edges as curves,
// each node a link to its stage with its state and timing. Order within a column follows the average
// row of a node's parents, which keeps most edges from crossing in the small DAGs pipelines have.

import { duration, s, span } from "./util.js";

const W = 170, H = 54, GX = 60, GY = 18, PAD = 12;
const FILL = {
  succeeded: ["#dff3e4", "#14532d"], failed: ["#fde2e1", "#8a1c14"], running: ["#dce9fb", "#153e75"],
  pending: ["#fff3cd", "#5c4400"], cancelled: ["#e8eaed", "#3b4149"], skipped: ["#e8eaed", "#3b4149"],
};

export function layout(stages) {
  const depth = {};
  const visit = (name, seen = new Set()) => {
    if (depth[name] !== undefined) return depth[name];
    if (seen.has(name)) return 0;
    seen.add(name);
    const needs = (stages[name].needs || []).filter((n) => stages[n]);
    depth[name] = needs.length ? 1 + Math.max(...needs.map((n) => visit(n, seen))) : 0;
    return depth[name];
  };
  Object.keys(stages).forEach((n) => visit(n));
  const columns = [];
  for (const name of Object.keys(stages)) (columns[depth[name]] ||= []).push(name);
  const row = {};
  columns.forEach((col) => {
    const key = (n) => {
      const parents = (stages[n].needs || []).filter((p) => row[p] !== undefined);
      return parents.length ? parents.reduce((a, p) => a + row[p], 0) / parents.length : 0;
    };
    col.sort((a, b) => key(a) - key(b) || a.localeCompare(b));
    col.forEach((n, i) => { row[n] = i; });
  });
  const pos = {};
  for (const name of Object.keys(stages)) {
    pos[name] = { x: PAD + depth[name] * (W + GX), y: PAD + row[name] * (H + GY) };
  }
  const width = PAD * 2 + columns.length * W + Math.max(0, columns.length - 1) * GX;
  const height = PAD * 2 + Math.max(1, ...columns.map((c) => c.length)) * (H + GY) - GY;
  return { pos, width, height };
}

export function drawDag(pipelineId, stages) {
  const { pos, width, height } = layout(stages);
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "group", "aria-label": "Pipeline stages" });
  for (const [name, st] of Object.entries(stages)) {
    for (const need of st.needs || []) {
      if (!pos[need]) continue;
      const a = pos[need], b = pos[name];
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      svg.append(s("path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" }));
    }
  }
  svg.prepend(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" },
    s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#6b7480" }))));
  for (const [name, st] of Object.entries(stages)) {
    const { x, y } = pos[name];
    const [bg, fg] = FILL[st.status] || FILL.pending;
    const last = st.attempts && st.attempts.length ? st.attempts[st.attempts.length - 1] : null;
    const time = last ? duration(span(last.started_at, last.finished_at)) : "";
    const tries = st.attempts && st.attempts.length > 1 ? ` · ${st.attempts.length} attempts` : "";
    const href = `#/pipelines/${encodeURIComponent(pipelineId)}/stages/${encodeURIComponent(name)}`;
    svg.append(s("a", { href, "data-stage": name, "data-status": st.status, "aria-label": `${name}: ${st.status}` },
      s("title", {}, `${name} (${st.kind}): ${st.status}${st.pending_reason ? ` — ${st.pending_reason}` : ""}`),
      s("rect", { x, y, width: W, height: H, rx: 6, fill: bg, stroke: fg, "stroke-width": st.status === "running" ? 2.5 : 1 }),
      s("text", { x: x + 10, y: y + 20, "font-weight": 600, fill: fg }, name.length > 20 ? `${name.slice(0, 19)}…` : name),
      s("text", { x: x + 10, y: y + 40, fill: fg }, `${st.status}${time && time !== "—" ? ` · ${time}` : ""}${tries}`)));
  }
  return svg;
}
