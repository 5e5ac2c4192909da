// Submit a pipeline: paste YAML (or JSON); the API validates it and its errors are shown at their line.

import { api } from "./api.js";
import { h, put } from "./util.js";

const EXAMPLE = `name: demo-noop
stages:
  prep:
    kind: noop
    with: {sleep_ms: 500}
  train:
    kind: noop
    needs: [prep]
    with: {sleep_ms: 2000}
  eval:
    kind: noop
    needs: [train]
`;

export function render(main, _args, ctx) {
  if (!ctx.can("member")) {
    main.append(h("h1", {}, "Submit a pipeline"), h("p", {}, `Your token has the ${ctx.me.role} role; submitting needs member or admin.`));
    return null;
  }
  const editor = h("textarea", { id: "spec", name: "spec", class: "editor", spellcheck: "false", autocomplete: "off", "aria-describedby": "spec-help" });
  editor.value = sessionStorage.getItem("verlyard.draft") || EXAMPLE;
  editor.addEventListener("input", () => sessionStorage.setItem("verlyard.draft", editor.value));
  const result = h("div", { id: "submit-result", "aria-live": "polite" });
  const button = h("button", { type: "submit", id: "submit" }, "Submit pipeline");
  const form = h("form", {
    onsubmit: async (e) => {
      e.preventDefault();
      button.disabled = true;
      result.replaceChildren();
      try {
        const p = await api("/api/v1/pipelines", { method: "POST", body: editor.value, type: "application/yaml" });
        sessionStorage.removeItem("verlyard.draft");
        ctx.go(`/pipelines/${encodeURIComponent(p.id)}`);
      } catch (err) {
        put(result, errors(editor.value, err));
        button.disabled = false;
      }
    },
  },
  h("label", { for: "spec" }, "Pipeline spec (YAML or JSON)"),
  h("p", { id: "spec-help", class: "muted" }, "Stage kinds: noop, preprocess, train, evaluate, export, cleanup, command. See the README for every field."),
  editor,
  h("div", { class: "row" }, button));
  main.append(h("h1", {}, "Submit a pipeline"), form, result);
  return null;
}

function errors(text, err) {
  const issues = (err.body && err.body.issues) || [];
  const bad = new Set(issues.map((i) => i.line).filter((n) => n));
  const box = h("div", { class: "error", role: "alert" },
    h("p", {}, err.status === 422 || err.status === 400 ? "The API refused this spec:" : err.message),
    h("ul", { id: "issues" }, issues.map((i) => h("li", { "data-line": i.line || "" },
      i.line ? `line ${i.line}: ` : "", i.path ? `${i.path}: ` : "", i.message))));
  if (bad.size === 0) return box;
  const lines = text.split("\n");
  return h("div", {}, box, h("ol", { class: "lines", "aria-label": "The spec with the lines in error marked" },
    lines.map((line, n) => h("li", { class: bad.has(n + 1) ? "bad" : null }, line || " "))));
}
