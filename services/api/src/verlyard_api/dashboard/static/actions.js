// Cancel and retry buttons, shown only to a token that may use them (the API checks it again).

import { api } from "./api.js";
import { h, put } from "./util.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export function actionButtons(p, ctx, status, after) {
  if (!ctx.canManage(p)) return null;
  const act = async (what, button) => {
    if (what === "cancel" && !window.confirm(`Cancel pipeline ${p.name}?`)) return;
    button.disabled = true;
    try {
      await api(`/api/v1/pipelines/${encodeURIComponent(p.id)}/${what}`, { method: "POST", body: {} });
      put(status, h("div", { class: "notice", role: "status" }, what === "cancel" ? "Cancel requested." : "Retry requested."));
      after();
    } catch (err) {
      put(status, h("div", { class: "error", role: "alert" }, err.message));
      button.disabled = false;
    }
  };
  const cancel = h("button", { type: "button", class: "danger", id: "cancel", disabled: FINAL.has(p.status) || p.cancel_requested, onclick: (e) => act("cancel", e.currentTarget) }, "Cancel pipeline");
  const retry = h("button", { type: "button", class: "secondary", id: "retry", disabled: !(p.status === "failed" || p.status === "cancelled"), onclick: (e) => act("retry", e.currentTarget) }, "Retry failed stages");
  return h("div", { class: "row" }, cancel, retry);
}
