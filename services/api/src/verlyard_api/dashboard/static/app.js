// The dashboard's shell: login, the role, and a hash router (the page's state lives in the URL, so a
// refresh or a shared link shows the same view). Each page renders into <main> and returns a cleanup.

import { api, setToken, token, whenUnauthorized } from "./api.js";
import { h, put } from "./util.js";
import * as pipelines from "./pipelines.js";
import * as pipeline from "./pipeline.js";
import * as stage from "./stage.js";
import * as agents from "./agents.js";
import * as hosts from "./hosts.js";
import * as submit from "./submit.js";

const RANK = { viewer: 0, member: 1, admin: 2 };
const main = document.getElementById("main");
const ctx = {
  me: null,
  can(role) { return this.me !== null && RANK[this.me.role] >= RANK[role]; },
  // Members cancel and retry their own pipelines; admins any (the API checks it too).
  canManage(p) { return this.can("admin") || (this.can("member") && p.submitted_by === this.me.actor); },
  go(path) { location.hash = path; },
};
let cleanup = null;

function parse() {
  const raw = location.hash.replace(/^#/, "") || "/pipelines";
  const [path, search = ""] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(search) };
}

function route(parts) {
  if (parts[0] === "pipelines" && parts.length === 1) return [pipelines, {}];
  if (parts[0] === "pipelines" && parts.length === 2) return [pipeline, { id: parts[1] }];
  if (parts[0] === "pipelines" && parts[2] === "stages" && parts.length === 4) return [stage, { id: parts[1], stage: parts[3] }];
  if (parts[0] === "agents") return [agents, {}];
  if (parts[0] === "hosts") return [hosts, {}];
  if (parts[0] === "submit") return [submit, {}];
  return [null, {}];
}

function renderWho() {
  const who = document.getElementById("who");
  who.replaceChildren();
  if (ctx.me) {
    who.append(
      h("span", {}, `${ctx.me.name} (${ctx.me.role})`),
      h("button", { type: "button", onclick: logout }, "Log out"),
    );
  }
  for (const link of document.querySelectorAll("[data-min-role]")) {
    link.hidden = !ctx.can(link.dataset.minRole);
  }
}

function logout() {
  setToken(null);
  ctx.me = null;
  renderWho();
  render();
}

function loginPage(message) {
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true, spellcheck: "false", size: 50 });
  const status = h("div", { "aria-live": "polite" }, message ? h("div", { class: "error", role: "alert" }, message) : null);
  const form = h("form", {
    onsubmit: async (e) => {
      e.preventDefault();
      setToken(input.value.trim());
      try {
        ctx.me = await api("/api/v1/whoami");
        renderWho();
        render();
      } catch (err) {
        setToken(null);
        put(status, h("div", { class: "error", role: "alert" }, err.status === 401 ? "That token is not valid." : err.message));
      }
    },
  },
  h("label", { for: "token" }, "API token"),
  input,
  h("p", { class: "muted" }, "The token stays in this tab (session storage) and is sent only to this server. ",
    "On the embedded stack the admin token is in $VERLYARD_HOME/admin-token; create others with `verlyard token create`."),
  h("div", {}, h("button", { type: "submit" }, "Log in")),
  status);
  put(main, h("section", { class: "login panel" }, h("h1", {}, "Log in to verlyard"), form));
  input.focus();
}

async function render() {
  if (cleanup) { cleanup(); cleanup = null; }
  const { parts, params } = parse();
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === (parts[0] || "pipelines") && parts.length <= 1) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!token()) { loginPage(); return; }
  if (!ctx.me) {
    try { ctx.me = await api("/api/v1/whoami"); } catch (err) {
      setToken(null);
      loginPage(err.status === 401 ? "Your token is no longer valid; log in again." : err.message);
      return;
    }
    renderWho();
  }
  const [page, args] = route(parts);
  main.replaceChildren();
  if (!page) { main.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/pipelines" }, "Pipelines"))); return; }
  cleanup = page.render(main, { ...args, params }, ctx) || null;
}

whenUnauthorized(() => {
  if (ctx.me) { ctx.me = null; setToken(null); renderWho(); loginPage("Your token is no longer valid; log in again."); }
});
window.addEventListener("hashchange", render);
render();
