// SSH hosts and their probe results. Only the fields listed here are shown: anything that looks like a
// credential is never rendered, whatever a future API adds.

import { api } from "./api.js";
import { badge, errorBox, h, when, put } from "./util.js";

const SECRET = /pass|secret|private|token|credential|key_?(data|material|pem)|^key$/i;

function probeView(probe) {
  if (!probe) return h("span", { class: "muted" }, "not probed");
  const rows = Object.entries(probe).filter(([k]) => !SECRET.test(k));
  return h("dl", { class: "kv" }, rows.map(([k, v]) => [h("dt", { class: "muted" }, k),
    h("dd", { class: "mono" }, typeof v === "object" && v !== null ? JSON.stringify(v, (kk, vv) => (SECRET.test(kk) ? undefined : vv)) : String(v))]));
}

export function render(main) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  main.append(h("h1", {}, "Hosts"), body);
  (async () => {
    try {
      const page = await api("/api/v1/hosts");
      if (!page.items || page.items.length === 0) {
        put(body, h("p", { class: "muted" }, "No SSH hosts yet. Add one with `verlyard hosts add`."));
        return;
      }
      put(body, h("table", { id: "hosts" },
        h("thead", {}, h("tr", {}, ["Host", "Address", "State", "GPUs", "Probe", "Probed"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, page.items.map((x) => h("tr", {},
          h("td", {}, h("strong", {}, x.name), x.agent ? h("div", { class: "mono muted" }, x.agent) : null),
          h("td", { class: "mono" }, `${x.user ? `${x.user}@` : ""}${x.address}${x.port ? `:${x.port}` : ""}`),
          h("td", {}, x.state ? badge(x.state) : ""),
          h("td", {}, x.gpus ?? ""),
          h("td", {}, probeView(x.probe)),
          h("td", {}, when(x.probed_at)))))));
    } catch (err) {
      if (err.status === 404 || err.status === 405) {
        put(body, h("p", { class: "muted" }, "This API serves no hosts list (SSH hosts are not available here)."));
      } else put(body, errorBox(err));
    }
  })();
  return null;
}
