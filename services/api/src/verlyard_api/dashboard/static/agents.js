// Agents: state, GPUs (memory, utilisation from the latest heartbeat), the stages each runs, heartbeat
// age; admins can drain one. Heartbeats are not events, so this page polls (every 5 s).

import { api } from "./api.js";
import { badge, errorBox, h, put } from "./util.js";

const REFRESH_MS = 5000;

function age(iso) {
  if (!iso) return "no heartbeat seen";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 120 ? `${s}s ago` : `${Math.round(s / 60)}m ago`;
}

function meter(pct, text) {
  const v = Math.max(0, Math.min(100, pct || 0));
  return h("span", {}, h("span", { class: "meter", role: "img", "aria-label": text }, h("span", { style: `width:${v}%` })), " ", text);
}

function gpus(list) {
  if (!list.length) return h("span", { class: "muted" }, "CPU only");
  return h("ul", {}, list.map((g) => h("li", {},
    `GPU ${g.index} ${g.name} · `,
    meter(g.memory_used_mb !== null ? (100 * g.memory_used_mb) / g.memory_total_mb : 0,
      g.memory_used_mb !== null ? `${(g.memory_used_mb / 1024).toFixed(1)} / ${(g.memory_total_mb / 1024).toFixed(1)} GiB` : `${(g.memory_total_mb / 1024).toFixed(1)} GiB`),
    " · ",
    meter(g.utilization_pct, g.utilization_pct !== null ? `${Math.round(g.utilization_pct)}% busy` : "utilisation unknown"))));
}

export function render(main, _args, ctx) {
  const status = h("div", { "aria-live": "polite" });
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  main.append(h("h1", {}, "Agents"), status, body);

  async function drain(agent, button) {
    if (!window.confirm(`Drain agent ${agent.hostname}? It finishes its running stages and takes no new ones.`)) return;
    button.disabled = true;
    try {
      await api(`/api/v1/agents/${encodeURIComponent(agent.id)}/drain`, { method: "POST", body: {} });
      put(status, h("div", { class: "notice", role: "status" }, `Drain requested for ${agent.hostname}.`));
      load();
    } catch (err) {
      put(status, errorBox(err));
      button.disabled = false;
    }
  }

  async function load() {
    try {
      const page = await api("/api/v1/agents");
      if (page.items.length === 0) { put(body, h("p", { class: "muted" }, "No agent has registered yet.")); return; }
      put(body, h("table", { id: "agents" },
        h("thead", {}, h("tr", {}, ["Agent", "State", "GPUs", "Running", "Heartbeat", ctx.can("admin") ? "Actions" : null].filter(Boolean).map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, page.items.map((a) => h("tr", { "data-agent": a.id },
          h("td", {}, h("strong", {}, a.hostname), a.id !== a.hostname ? h("div", { class: "mono muted" }, a.id) : null, a.version ? h("div", { class: "muted" }, `v${a.version} · ${a.cpu_slots} CPU slots`) : null),
          h("td", {}, badge(a.state), a.reason ? h("div", { class: "muted" }, a.reason) : null),
          h("td", {}, gpus(a.gpus)),
          h("td", {}, a.attempts.length === 0 ? h("span", { class: "muted" }, "idle") : h("ul", {}, a.attempts.map((t) => h("li", {},
            h("a", { href: `#/pipelines/${encodeURIComponent(t.pipeline_id)}/stages/${encodeURIComponent(t.stage)}` }, `${shortId(t.pipeline_id)} / ${t.stage}`),
            ` #${t.number} `, badge(t.status))))),
          h("td", { "data-heartbeat": a.last_heartbeat_at || "" }, age(a.last_heartbeat_at)),
          ctx.can("admin") ? h("td", {}, a.state === "active"
            ? h("button", { type: "button", class: "secondary", onclick: (e) => drain(a, e.currentTarget) }, `Drain ${a.hostname}`)
            : h("span", { class: "muted" }, "—")) : null)))));
    } catch (err) {
      put(body, errorBox(err));
    }
  }

  load();
  const timer = setInterval(load, REFRESH_MS);
  return () => clearInterval(timer);
}
