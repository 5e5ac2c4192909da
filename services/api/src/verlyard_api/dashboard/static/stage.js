// One stage: its attempts, checkpoint and outputs; metric charts (the API downsamples long series and
// marks the steps a resume rolled back), refreshed when the pipeline's stream brings new points for
// this stage; the latest attempt's log, following live.

import { api, query } from "./api.js";
import { lineChart } from "./chart.js";
import { follow } from "./sse.js";
import { badge, debounce, duration, errorBox, h, put, shortId, span, when } from "./util.js";

const MAX_POINTS = 600;
const MAX_LOG_LINES = 2000;
const PREFERRED = [/loss/i, /(^|\/)lr$|learning_rate/i, /grad_?norm/i];

export function render(main, { id, stage, params }, ctx) {
  const enc = encodeURIComponent(id), encStage = encodeURIComponent(stage);
  const base = `/api/v1/pipelines/${enc}/stages/${encStage}`;
  let chosen = (params.get("keys") || "").split(",").filter(Boolean);
  const head = h("div", {});
  const info = h("div", {});
  const picker = h("div", {});
  const charts = h("div", { id: "charts" });
  const checkpoints = h("tbody", {});
  let numbers = {};
  const logs = h("pre", { class: "logs", id: "logs", tabindex: "0", "aria-label": "Log output", "aria-live": "off" });
  const logState = h("span", { class: "muted", "aria-live": "polite" });
  const live = h("span", { class: "muted", "aria-live": "polite" });
  const outputs = h("div", { class: "kv", id: "outputs" });
  main.append(head, info,
    h("div", { class: "row" }, h("h2", {}, "Metrics"), live), picker, charts,
    h("div", { class: "row" }, h("h2", {}, "Logs"), logState), logs,
    h("h2", {}, "Outputs"), outputs,
    h("h2", {}, "Checkpoints"),
    h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, ["Step", "Attempt", "Path", "Size", "Saved"].map((c) => h("th", { scope: "col" }, c)))), checkpoints));
  let keys = [];
  let closed = false;
  let streams = [];

  async function loadStage() {
    try {
      const p = await api(`/api/v1/pipelines/${enc}`);
      const st = p.stages[stage];
      if (!st) throw new Error(`pipeline ${p.name} has no stage ${stage}`);
      numbers = Object.fromEntries(st.attempts.map((a) => [a.id, a.number]));
      put(head, 
        h("p", {}, h("a", { href: `#/pipelines/${enc}` }, `← ${p.name}`)),
        h("div", { class: "row" }, h("h1", {}, stage), badge(st.status), h("span", { class: "muted" }, st.kind)));
      put(info, 
        st.pending_reason ? h("div", { class: "notice" }, `Pending: ${st.pending_reason}`) : null,
        h("table", { id: "attempts" },
          h("thead", {}, h("tr", {}, ["Attempt", "Status", "Agent", "Started", "Took", "Step", "Failure", "Resumed from"].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, st.attempts.map((a) => h("tr", {},
            h("td", {}, `#${a.number}`), h("td", {}, badge(a.status)), h("td", { class: "mono" }, a.agent || "—"),
            h("td", {}, when(a.started_at)), h("td", {}, duration(span(a.started_at, a.finished_at))),
            h("td", {}, a.step !== null ? `${a.step}${a.total_steps ? ` / ${a.total_steps}` : ""}` : "—"),
            h("td", {}, a.failure_class || ""), h("td", {}, a.resumed_from_step ?? ""))))));
      put(outputs,
          h("span", { class: "muted" }, "Latest checkpoint"),
          h("span", { class: "mono" }, st.checkpoint ? `step ${st.checkpoint.step}: ${st.checkpoint.path}` : "none"),
          Object.entries(st.outputs || {}).map(([k, v]) => [h("span", { class: "muted" }, k), h("span", { class: "mono" }, typeof v === "object" ? JSON.stringify(v) : String(v))]));
    } catch (err) {
      put(head, errorBox(err));
    }
  }

  function checkpointRow(ev) {
    const d = ev.data;
    const size = d.size_bytes ? `${(d.size_bytes / 2 ** 20).toFixed(1)} MiB` : "—";
    return h("tr", {}, h("td", {}, d.step), h("td", {}, numbers[d.attempt] ? `#${numbers[d.attempt]}` : shortId(d.attempt)),
      h("td", { class: "mono" }, d.path), h("td", {}, size), h("td", {}, when(ev.recorded_at)));
  }

  // Every checkpoint the stage saved, from the pipeline's audit trail (the read model keeps the latest).
  async function loadCheckpoints() {
    const rows = [];
    let after = 0;
    try {
      for (;;) {
        const page = await api(`/api/v1/pipelines/${enc}/events?after=${after}&limit=1000`);
        rows.push(...page.items.filter((ev) => ev.type === "checkpoint.saved" && ev.data.stage === stage));
        if (page.next === null || page.items.length === 0) break;
        after = page.next;
      }
      put(checkpoints, rows.length ? rows.map(checkpointRow) : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No checkpoint yet.")));
    } catch (err) {
      put(checkpoints, h("tr", {}, h("td", { colspan: 5 }, errorBox(err))));
    }
  }

  function setKeys(next) {
    chosen = next;
    const q = new URLSearchParams(location.hash.split("?")[1] || "");
    q.set("keys", next.join(","));
    history.replaceState(null, "", `#/pipelines/${enc}/stages/${encStage}?${q}`);
    loadMetrics();
  }

  function drawPicker() {
    if (keys.length === 0) { picker.replaceChildren(); return; }
    put(picker, h("fieldset", { class: "toolbar" }, h("legend", {}, "Metric keys"),
      keys.map((k, i) => h("span", {},
        h("input", { type: "checkbox", id: `key-${i}`, checked: chosen.includes(k), onchange: (e) => setKeys(e.target.checked ? [...chosen, k] : chosen.filter((c) => c !== k)) }),
        " ", h("label", { for: `key-${i}` }, k)))));
  }

  async function loadMetrics() {
    try {
      const m = await api(`${base}/metrics${query({ max_points: MAX_POINTS, keys: keys.length ? chosen.join(",") : "" })}`);
      if (keys.length === 0 || m.keys.some((k) => !keys.includes(k))) {
        if (keys.length === 0 && chosen.length === 0) {
          chosen = m.keys.filter((k) => PREFERRED.some((re) => re.test(k))).slice(0, 4);
          if (chosen.length === 0) chosen = m.keys.slice(0, 3);
        }
        keys = [...new Set([...keys, ...m.keys])].sort();
        drawPicker();
      }
      if (m.keys.length === 0) { put(charts, h("p", { class: "muted" }, "No metrics recorded yet.")); return; }
      put(charts, ...chosen.filter((k) => m.keys.includes(k)).map((k) => {
        const eff = (m.effective || []).find((e) => e.key === k);
        const own = m.series.filter((x) => x.key === k);
        const curve = eff ? eff.points : own.flatMap((x) => x.points);
        const rolled = own.map((x) => ({ number: x.number, points: x.points.filter((p) => p.rolled_back) }));
        return lineChart(k, curve, rolled, { downsampled: (eff && eff.downsampled) || own.some((x) => x.downsampled) });
      }));
    } catch (err) {
      put(charts, errorBox(err));
    }
  }

  let logStream = null;
  function followLogs() {
    if (logStream) logStream.close();
    let count = 0;
    logs.replaceChildren();
    const s = follow(`${base}/logs?follow=true`, (type, line) => {
      if (type === "end") { logState.textContent = "attempt ended"; return; }
      if (type !== "log" || !line) return;
      const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 8;
      logs.append(h("span", { class: line.stream === "stderr" ? "stderr" : null }, `${line.text}\n`));
      if (++count > MAX_LOG_LINES) logs.firstChild.remove();
      if (atBottom) logs.scrollTop = logs.scrollHeight;
    }, { onState: (st) => { if (st === "open") logState.textContent = "following"; else if (st === "reconnecting") logState.textContent = "reconnecting…"; } });
    logStream = s;
  }

  const refreshMetrics = debounce(loadMetrics, 500);
  const refreshStage = debounce(loadStage, 300);
  (async () => {
    let cursor = "";
    try { cursor = (await api(`/api/v1/pipelines/${enc}/stream/head`)).cursor; } catch { /* from the start */ }
    await Promise.all([loadStage(), loadMetrics()]);
    await loadCheckpoints();
    if (closed) return; // the user left the page meanwhile
    streams.push(follow(`/api/v1/pipelines/${enc}/stream?logs=false`, (type, data) => {
      if (type === "metrics") {
        if (data.points.some((p) => p.stage === stage)) refreshMetrics();
      } else if (data && data.data && (data.data.stage === stage || type.startsWith("pipeline."))) {
        refreshStage();
        if (type === "attempt.started" || type === "stage.placed") refreshMetrics();
        if (type === "attempt.started" && data.data.stage === stage) followLogs();
        if (type === "checkpoint.saved" && data.data.stage === stage) {
          if (checkpoints.querySelector("td[colspan]")) put(checkpoints);
          checkpoints.append(checkpointRow(data));
        }
      }
    }, { lastId: cursor, onState: (st) => { live.textContent = st === "open" ? "live" : st === "reconnecting" ? "reconnecting…" : ""; } }));
    followLogs();
    window.__verlyardStreams = { stream: streams[0], logs: () => logStream }; // tests drop connections to check resuming
  })();
  return () => { closed = true; refreshMetrics.cancel(); refreshStage.cancel(); streams.forEach((x) => x.close()); if (logStream) logStream.close(); };
}
