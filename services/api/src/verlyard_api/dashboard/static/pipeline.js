// One pipeline: the DAG with each stage's state and timing, attempts (agent, failure class), pending
// reasons, and the event timeline; live through the pipeline's stream (events only here).

import { api } from "./api.js";
import { actionButtons } from "./actions.js";
import { drawDag } from "./dag.js";
import { follow } from "./sse.js";
import { badge, debounce, duration, errorBox, h, shortId, span, when, put } from "./util.js";

export function render(main, { id }, ctx) {
  const enc = encodeURIComponent(id);
  const head = h("div", {});
  const status = h("div", { "aria-live": "polite" });
  const dag = h("div", { class: "dag", id: "dag" });
  const stages = h("div", {});
  const rows = h("tbody", {});
  const live = h("span", { class: "muted", "aria-live": "polite" });
  main.append(head, status, h("h2", {}, "Stages"), dag, stages,
    h("div", { class: "row" }, h("h2", {}, "Event timeline"), live),
    h("table", { id: "timeline" }, h("thead", {}, h("tr", {}, ["#", "Time", "Type", "Stage", "Details", "Actor"].map((c) => h("th", { scope: "col" }, c)))), rows));
  let stream = null;
  let afterAction = () => {};

  async function load() {
    try {
      const p = await api(`/api/v1/pipelines/${enc}`);
      put(head, 
        h("div", { class: "row" }, h("h1", {}, p.name), badge(p.status), p.cancel_requested && p.status === "running" ? h("span", { class: "muted" }, "cancel requested") : null),
        h("div", { class: "kv" },
          h("span", { class: "muted" }, "Id"), h("span", { class: "mono" }, p.id),
          h("span", { class: "muted" }, "Submitted"), h("span", {}, `${when(p.created_at)} by ${p.submitted_by}`),
          h("span", { class: "muted" }, "Finished"), h("span", {}, when(p.finished_at)),
          p.reason ? [h("span", { class: "muted" }, "Reason"), h("span", {}, p.reason)] : null),
        actionButtons(p, ctx, status, () => afterAction()));
      put(dag, drawDag(p.id, p.stages));
      put(stages, stageTable(p));
    } catch (err) {
      put(head, errorBox(err));
    }
  }

  function stageTable(p) {
    return h("table", { id: "stages" },
      h("thead", {}, h("tr", {}, ["Stage", "Kind", "Status", "Attempts", "Pending reason / outcome"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, Object.entries(p.stages).map(([name, st]) => h("tr", {},
        h("td", {}, h("a", { href: `#/pipelines/${enc}/stages/${encodeURIComponent(name)}` }, name)),
        h("td", {}, st.kind),
        h("td", {}, badge(st.status)),
        h("td", {}, st.attempts.length === 0 ? h("span", { class: "muted" }, "none yet") : h("ul", {}, st.attempts.map((a) => h("li", {},
          `#${a.number} `, badge(a.status), ` on ${a.agent || "?"} · ${duration(span(a.started_at, a.finished_at))}`,
          a.failure_class ? ` · failure: ${a.failure_class}` : "",
          a.resumed_from_step !== null ? ` · resumed from step ${a.resumed_from_step}` : "",
          a.exit_code !== null ? ` · exit ${a.exit_code}` : "")))),
        h("td", {}, st.pending_reason || st.reason || "")))));
  }

  function eventRow(ev) {
    const d = ev.data || {};
    // The stage has its own column; the pipeline id is the page's; empty fields say nothing.
    const details = Object.entries(d).filter(([k, v]) => v !== null && v !== "" && !["stage", "attempt", "spec", "pipeline_id"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    return h("tr", {},
      h("td", {}, ev.version), h("td", {}, when(ev.recorded_at)), h("td", { class: "mono" }, ev.type),
      h("td", {}, d.stage || ""), h("td", { class: "mono" }, details.length > 160 ? `${details.slice(0, 159)}…` : details),
      h("td", { class: "mono" }, ev.actor.replace(/^token:[^:]+:/, "token:")));
  }

  const reload = debounce(load, 300);
  let lastId = "";
  let ended = false;
  // The stream replays the pipeline's whole history first, which fills the timeline, then goes live; it
  // ends once the pipeline finished (a retry from this page opens it again where it stopped).
  function open() {
    ended = false;
    stream = follow(`/api/v1/pipelines/${enc}/stream?metrics=false&logs=false`, (type, ev, id) => {
      lastId = id;
      if (type === "end") { ended = true; return; }
      if (!ev || !ev.type) return;
      rows.append(eventRow(ev));
      reload();
    }, {
      lastId,
      onState: (st, code) => {
        live.textContent = st === "open" ? "live" : st === "reconnecting" ? "reconnecting…" : ended ? "finished" : "";
        if (st === "error") live.textContent = `stream unavailable (HTTP ${code})`;
      },
    });
  }
  afterAction = () => { load(); if (ended) open(); };
  load();
  open();
  return () => { reload.cancel(); stream.close(); };
}
