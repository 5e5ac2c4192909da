// SSH hosts and their probe results. The known probe fields are shown plainly; anything else is listed
// only when its name does not look like a credential (whatever a future API adds, no secret is drawn).

import { api } from "./api.js";
import { badge, errorBox, h, put, when } from "./util.js";

const SECRET = /pass|secret|private|token|credential|key_?(data|material|pem)|^key$/i;
const KNOWN = new Set(["ok", "error", "home", "gpus", "gpu_note", "driver_version", "cuda_version",
  "disk_free_bytes", "disk_total_bytes", "trainer_python", "verl_version", "verl_error"]);

const gib = (b) => `${(b / 2 ** 30).toFixed(1)} GiB`;

function probeView(probe) {
  if (!probe) return h("span", { class: "muted" }, "not probed");
  const item = (label, value) => (value === null || value === undefined || value === "" ? null : [h("dt", { class: "muted" }, label), h("dd", {}, value)]);
  const gpus = (probe.gpus || []).map((g) => `GPU ${g.index} ${g.name} (${(g.memory_total_mb / 1024).toFixed(0)} GiB)`).join(", ");
  const extra = Object.entries(probe).filter(([k, v]) => !KNOWN.has(k) && !SECRET.test(k) && v !== null && typeof v !== "object");
  return h("dl", { class: "kv" },
    item("result", probe.ok ? badge("ok") : badge("failed")),
    item("error", probe.error),
    item("GPUs", gpus || probe.gpu_note || "none"),
    item("driver / CUDA", probe.driver_version ? `${probe.driver_version} / ${probe.cuda_version || "?"}` : null),
    item("disk free", probe.disk_free_bytes != null ? `${gib(probe.disk_free_bytes)} of ${gib(probe.disk_total_bytes || 0)}` : null),
    item("trainer", probe.trainer_python ? `${probe.trainer_python}${probe.verl_version ? ` · verl ${probe.verl_version}` : ""}` : null),
    item("verl", probe.verl_error),
    extra.map(([k, v]) => item(k, String(v))));
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
        h("thead", {}, h("tr", {}, ["Host", "Address", "State", "Probe", "Probed"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, page.items.map((x) => h("tr", { "data-host": x.name },
          h("td", {}, h("strong", {}, x.name), x.agent ? h("div", { class: "mono muted" }, `agent ${x.agent}`) : null),
          h("td", { class: "mono" }, `${x.user ? `${x.user}@` : ""}${x.address}${x.port ? `:${x.port}` : ""}`,
            x.host_key_fingerprint ? h("div", { class: "muted" }, x.host_key_fingerprint) : null),
          h("td", {}, x.state ? badge(x.state) : ""),
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
