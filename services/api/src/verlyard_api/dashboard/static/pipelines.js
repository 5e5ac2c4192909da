// The pipelines list: status filter and name search done by the API (cursor pages of 50), kept live by
// following the global event log from its head and reloading the page when a pipeline changes.

import { api, query } from "./api.js";
import { follow } from "./sse.js";
import { badge, debounce, errorBox, h, shortId, when, put } from "./util.js";

const STATUSES = ["", "pending", "running", "succeeded", "failed", "cancelled"];
const PAGE = 50;
const MAX_PAGE = 500;

export function render(main, { params }, ctx) {
  const status = params.get("status") || "";
  const q = params.get("q") || "";
  const cursor = params.get("cursor") || "";
  const trail = (params.get("trail") || "").split(",").filter(Boolean);
  const size = Math.min(MAX_PAGE, Math.max(1, Number(params.get("limit")) || PAGE));
  const limit = size === PAGE ? "" : String(size); // in the URL only when not the default
  let stream = null;
  let closed = false;
  let shown = new Set();

  const setHash = (next) => {
    const merged = { status, q, limit, ...next };
    ctx.go(`/pipelines${query(merged)}`);
  };
  const statusSelect = h("select", { id: "f-status", name: "status", onchange: (e) => setHash({ status: e.target.value }) },
    STATUSES.map((st) => h("option", { value: st, selected: st === status }, st || "any")));
  const search = h("input", { id: "f-q", name: "q", type: "search", value: q, placeholder: "part of a name", autocomplete: "off" });
  const form = h("form", { class: "toolbar", role: "search", onsubmit: (e) => { e.preventDefault(); setHash({ q: search.value.trim().toLowerCase() }); } },
    h("div", { class: "field" }, h("label", { for: "f-status" }, "Status"), statusSelect),
    h("div", { class: "field" }, h("label", { for: "f-q" }, "Name contains"), search),
    h("button", { type: "submit" }, "Search"),
    ctx.can("member") ? h("a", { class: "button", href: "#/submit" }, "Submit a pipeline") : null);
  const live = h("span", { class: "muted", "aria-live": "polite" });
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  main.append(h("div", { class: "row" }, h("h1", {}, "Pipelines"), live), form, body);

  async function load() {
    try {
      const page = await api(`/api/v1/pipelines${query({ status, q, cursor, limit: size })}`);
      shown = new Set(page.items.map((p) => p.id));
      put(body, table(page.items), pager(page.next));
    } catch (err) {
      put(body, errorBox(err));
    }
  }

  function table(items) {
    if (items.length === 0) return h("p", { class: "muted" }, "No pipelines match.");
    return h("table", { id: "pipelines" },
      h("thead", {}, h("tr", {}, ["Name", "Status", "Stages", "Created", "Finished", "Id"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, items.map((p) => h("tr", { "data-id": p.id },
        h("td", {}, h("a", { href: `#/pipelines/${encodeURIComponent(p.id)}` }, p.name)),
        h("td", {}, badge(p.status)),
        h("td", {}, Object.entries(p.stage_statuses).map(([name, st]) => h("span", { class: `badge s-${st}`, title: `${name}: ${st}` }, name)), " "),
        h("td", {}, when(p.created_at)),
        h("td", {}, when(p.finished_at)),
        h("td", { class: "mono" }, shortId(p.id))))));
  }

  function pager(next) {
    const parts = [];
    if (cursor) {
      const back = trail.slice(0, -1);
      parts.push(h("a", { href: `#/pipelines${query({ status, q, limit })}` }, "First page"));
      parts.push(h("a", { href: `#/pipelines${query({ status, q, limit, cursor: trail[trail.length - 1] || "", trail: back.join(",") })}` }, "Newer"));
    }
    if (next) parts.push(h("a", { href: `#/pipelines${query({ status, q, limit, cursor: next, trail: [...trail, cursor].join(",") })}`, rel: "next" }, "Older"));
    return h("nav", { class: "pager", "aria-label": "Pages" }, parts);
  }

  const reload = debounce(load, 400);
  (async () => {
    let head = 0;
    try { head = (await api("/api/v1/events/head")).position; } catch { /* the list still loads */ }
    await load();
    if (closed) return; // the user left the page meanwhile
    stream = follow(`/api/v1/events?follow=true&after=${head}`, (type, ev) => {
      if (!ev || !ev.stream_id || !ev.stream_id.startsWith("pipeline-")) return;
      const id = ev.stream_id.slice("pipeline-".length);
      // A new pipeline matters on the first page; a change matters when it is shown.
      if (shown.has(id) || (type === "pipeline.submitted" && !cursor)) reload();
    }, { onState: (st) => { live.textContent = st === "open" ? "live" : st === "reconnecting" ? "reconnecting…" : ""; } });
  })();
  return () => { closed = true; reload.cancel(); if (stream) stream.close(); };
}
