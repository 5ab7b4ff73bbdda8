// Talking to the server: the token (from the URL fragment, kept for this tab only),
// JSON requests, and the server's own error message on any non-2xx answer.

const KEY = "dispatch-token";

export function token() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(KEY, decodeURIComponent(match[1]));
    // Out of the address bar: not copied along with a link or kept in history.
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(KEY);
}

/** Whether `err` is the server's answer with this HTTP status. */
export function answered(err, status) {
  return err?.name === "ApiError" && err.status === status;
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `the server answered ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = body?.error?.code;
    this.kind = body?.error?.kind;
  }
}

export function headers(extra = {}) {
  return { Authorization: `Bearer ${token()}`, ...extra };
}

async function request(method, path, { text = false } = {}) {
  let response;
  try {
    response = await fetch(path, { method, headers: headers(), cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, { error: { message: `the server cannot be reached (${err.message})` } });
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch { /* not JSON: the status says it */ }
    throw new ApiError(response.status, body);
  }
  return text ? response.text() : response.json();
}

export const get = (path) => request("GET", path);
export const getText = (path) => request("GET", path, { text: true });
export const post = (path) => request("POST", path);

export const latest = (attempts) => (attempts && attempts.length ? attempts[attempts.length - 1] : null);
