// The API client: the token lives in sessionStorage (gone when the tab closes) and goes out only as a
// bearer header on same-origin requests, never in a URL.

const KEY = "verlyard.token";

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.detail ? `${body.detail}` : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

export function authHeaders(extra) {
  const headers = new Headers(extra || {});
  const t = token();
  if (t) headers.set("Authorization", `Bearer ${t}`);
  return headers;
}

let onUnauthorized = () => {};
export function whenUnauthorized(fn) {
  onUnauthorized = fn;
}

export async function api(path, { method = "GET", body, type, signal } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  let payload = body;
  if (body !== undefined && typeof body !== "string") {
    payload = JSON.stringify(body);
    headers.set("Content-Type", "application/json");
  } else if (type) {
    headers.set("Content-Type", type);
  }
  const response = await fetch(path, { method, headers, body: payload, signal, cache: "no-store" });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (response.status === 401) onUnauthorized();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const text = q.toString();
  return text ? `?${text}` : "";
}
