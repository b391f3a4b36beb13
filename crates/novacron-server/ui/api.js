// Talking to the server: JSON calls with the CSRF header, and collections
// kept current from list + watch streams (newline-delimited JSON read off a
// streaming fetch), re-listed when the server says the watch is too old.

function csrf() {
  const m = document.cookie.match(/(?:^|;\s*)nc_csrf=([^;]+)/);
  return m ? m[1] : "";
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
    this.field = body?.error?.field;
  }
}

export async function call(method, path, body) {
  const opts = { method, headers: { "x-novacron-csrf": csrf() }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (!resp.ok) {
    if (resp.status === 401 && !path.startsWith("/ui/session")) window.dispatchEvent(new Event("nc-logged-out"));
    throw new ApiError(resp.status, data);
  }
  return data;
}

export const get = (p) => call("GET", p);
export const post = (p, b) => call("POST", p, b ?? {});
export const put = (p, b) => call("PUT", p, b);
export const del = (p) => call("DELETE", p);

/** Every page of a list. */
export async function listAll(path, query = "") {
  let items = [];
  let cont = "";
  let rv = 0;
  for (;;) {
    const sep = query ? "&" : "";
    const page = await get(`${path}?limit=1000${sep}${query}${cont ? `&continue=${cont}` : ""}`);
    if (!rv) rv = page.resource_version;
    items = items.concat(page.items);
    if (!page.continue) return { items, rv };
    cont = page.continue;
  }
}

/** Reads a newline-delimited JSON stream, calling onLine for each value. */
async function readLines(resp, onLine, signal) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  while (!signal.aborted) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (line) onLine(JSON.parse(line));
    }
  }
}

/**
 * Objects of one list endpoint, kept current: list, then watch from the
 * list's revision; on a broken stream, watch again from the last revision
 * seen (or list again if the server no longer has it). Subscribers are
 * told of changes once per animation frame at most.
 */
export class Collection {
  constructor(path, query = "") {
    this.path = path;
    this.query = query;
    this.objects = new Map();
    this.synced = false;
    this.subscribers = new Set();
    this.abort = new AbortController();
    this.pending = false;
    this.changedNames = new Set();
    this.run();
  }

  subscribe(fn) {
    this.subscribers.add(fn);
    if (this.synced) fn(this, null);
    return () => this.subscribers.delete(fn);
  }

  notify(name) {
    if (name) this.changedNames.add(name);
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      const changed = this.changedNames;
      this.changedNames = new Set();
      for (const fn of this.subscribers) fn(this, changed);
    });
  }

  values() {
    return [...this.objects.values()];
  }

  close() {
    this.abort.abort();
  }

  async run() {
    let delay = 250;
    let rv = 0;
    while (!this.abort.signal.aborted) {
      try {
        if (!rv) {
          const { items, rv: listed } = await listAll(this.path, this.query);
          this.objects = new Map(items.map((o) => [o.metadata.name, o]));
          rv = listed;
          this.synced = true;
          this.notify(null);
        }
        const q = `${this.query ? this.query + "&" : ""}watch=true&resource_version=${rv}`;
        const resp = await fetch(`${this.path}?${q}`, { credentials: "same-origin", signal: this.abort.signal });
        if (resp.status === 410) {
          rv = 0;
          continue;
        }
        if (resp.status === 401) window.dispatchEvent(new Event("nc-logged-out"));
        if (!resp.ok) throw new Error(`watch ${this.path}: HTTP ${resp.status}`);
        delay = 250;
        await readLines(
          resp,
          (ev) => {
            const o = ev.object;
            rv = Math.max(rv, o.metadata.resource_version || 0);
            if (ev.type === "Deleted") this.objects.delete(o.metadata.name);
            else this.objects.set(o.metadata.name, o);
            this.notify(o.metadata.name);
          },
          this.abort.signal,
        );
      } catch (e) {
        if (this.abort.signal.aborted) return;
        if (e instanceof ApiError && e.status === 410) rv = 0;
        console.warn(`${this.path}: ${e.message}; again in ${delay} ms`);
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 5000);
    }
  }
}
