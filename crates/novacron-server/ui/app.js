// The dashboard: session, navigation, and the pages other than VMs (vm.js).
// Pages read collections kept live by watch streams (api.js); nothing polls
// but the per-VM charts, which sample the VM's counters.

import { ApiError, Collection, call, del, get, listAll, post } from "./api.js";
import { actionButton, age, bar, bytes, clear, field, h, phaseBadge, table, time, toast } from "./views.js";
import { consolePage, createVmPage, vmPage, vmsPage } from "./vm.js";

const root = document.getElementById("app");

/** The caller, as /ui/session says; permissions as "resource:verb". */
export const session = { me: null, can: () => false };

function setSession(me) {
  session.me = me;
  const perms = new Set(me?.permissions || []);
  session.can = (resource, verb) => perms.has(`${resource}:${verb}`);
}

// The overview's and events page's events: the last hour's at the dashboard's start.
const RECENT = `since=${encodeURIComponent(new Date(Date.now() - 3600e3).toISOString())}`;

// Collections shared by the pages, opened on first use, closed at log-out.
const collections = new Map();
export function live(path, query = "") {
  const key = `${path}?${query}`;
  if (!collections.has(key)) collections.set(key, new Collection(path, query));
  return collections.get(key);
}
/** A collection for the page on screen only (one object's events): closed
 *  when the page changes, so browsing many objects holds no streams open. */
export function pageLive(path, query = "") {
  const c = new Collection(path, query);
  onPage(() => c.close());
  return c;
}
function closeAll() {
  for (const c of collections.values()) c.close();
  collections.clear();
}

/** Subscriptions of the page on screen; dropped when it changes. */
let pageSubscriptions = [];
export function onPage(unsubscribe) {
  pageSubscriptions.push(unsubscribe);
}
function leavePage() {
  for (const u of pageSubscriptions) u();
  pageSubscriptions = [];
}

/** Renders `draw()` whenever one of `cols` changes. */
export function follow(cols, draw) {
  let scheduled = false;
  const redraw = () => {
    if (scheduled) return;
    scheduled = true;
    queueMicrotask(() => {
      scheduled = false;
      draw();
    });
  };
  for (const c of cols) onPage(c.subscribe(redraw));
  draw();
}

// ------------------------------------------------------------ login

function loginPage() {
  const user = h("input", { name: "user", autocomplete: "username", placeholder: "admin" });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password" });
  const totp = h("input", { name: "totp", inputmode: "numeric", placeholder: "if enabled" });
  const token = h("input", { name: "token", type: "password", placeholder: "or an API token" });
  const error = h("p.error");
  const submit = async (e) => {
    e.preventDefault();
    error.textContent = "";
    const body = token.value.trim()
      ? { token: token.value.trim() }
      : { user: user.value.trim(), password: password.value, totp: totp.value.trim() || undefined };
    try {
      setSession(await call("POST", "/ui/session", body));
      location.hash = "#/";
      render();
    } catch (err) {
      error.textContent = err.message;
    }
  };
  clear(
    root,
    h(
      "form.login",
      { onsubmit: submit },
      h("h1", "NovaCron"),
      field("User", user),
      field("Password", password),
      field("TOTP code", totp),
      h("div.or", "— or —"),
      field("API token", token),
      h("button.primary", { type: "submit", name: "login" }, "Log in"),
      error,
    ),
  );
}

// ------------------------------------------------------------ layout

const NAV = [
  ["#/", "Overview", null],
  ["#/nodes", "Nodes", "nodes"],
  ["#/vms", "VMs", "vms"],
  ["#/migrations", "Migrations", "migrations"],
  ["#/events", "Events", "events"],
  ["#/images", "Images", "images"],
  ["#/networks", "Networks", "networks"],
  ["#/volumes", "Volumes", "volumes"],
  ["#/backups", "Backups", "backups"],
  ["#/projects", "Projects", "projects"],
  ["#/users", "Users", "users"],
  ["#/tokens", "Tokens", "tokens"],
  ["#/audit", "Audit", "audit"],
];

function layout(title, ...content) {
  const here = location.hash || "#/";
  const nav = NAV.filter(([, , r]) => !r || session.can(r, "read")).map(([href, label]) =>
    h("a", { href, class: (href === "#/" ? here === "#/" : here.startsWith(href)) ? "active" : null }, label),
  );
  const logout = actionButton("Log out", async () => {
    await del("/ui/session");
    loggedOut();
  });
  clear(
    root,
    h(
      "div.shell",
      h(
        "nav.side",
        h("div.brand", "NovaCron"),
        nav,
        h("div.me", h("div", session.me?.actor), h("small.muted", `${session.me?.role}${session.me?.project ? " @ " + session.me.project : ""}`), logout),
      ),
      h("main", h("h1", title), ...content),
    ),
  );
}

function loggedOut() {
  leavePage();
  closeAll();
  setSession(null);
  location.hash = "#/login";
  render();
}
window.addEventListener("nc-logged-out", () => {
  if (session.me) loggedOut();
});

// ------------------------------------------------------------ overview

/** Resources the VMs bound to each node hold. */
export function allocation(vms) {
  const by = new Map();
  for (const v of vms) {
    const n = v.status?.node;
    if (!n) continue;
    const a = by.get(n) || { vcpus: 0, memory_mib: 0, vms: 0 };
    a.vcpus += v.spec.vcpus;
    a.memory_mib += v.spec.memory_mib;
    a.vms += 1;
    by.set(n, a);
  }
  return by;
}

function nodeCard(n, alloc) {
  const a = alloc.get(n.metadata.name) || { vcpus: 0, memory_mib: 0, vms: 0 };
  const cap = n.status.capacity || {};
  return h(
    "a.card.node",
    { href: `#/nodes/${n.metadata.name}`, "data-node": n.metadata.name },
    h("div.card-title", n.metadata.name, " ", h(`span.badge.${n.status.ready ? "ok" : "bad"}`, n.status.ready ? "Ready" : "NotReady"), n.spec.schedulable ? null : h("span.badge.warn", "Cordoned")),
    bar("vCPU", a.vcpus, cap.vcpus),
    bar("Memory", a.memory_mib * 1048576, cap.memory_mib * 1048576, bytes),
    h("small.muted", `${a.vms} VMs · ${n.status.accel || "?"}`),
  );
}

export function migrationProgress(m) {
  const p = m.status.progress || {};
  const pct = p.total_bytes ? Math.min(100, (100 * p.transferred_bytes) / Math.max(1, p.transferred_bytes + p.remaining_bytes)) : 0;
  const done = ["Completed", "Failed", "Cancelled"].includes(m.status.phase);
  return h(
    "div.migration",
    { "data-migration": m.metadata.name },
    h("div", h("b", m.spec.vm), ` ${m.status.source_node || "?"} → ${m.status.target_node || "?"} `, phaseBadge(m.status.phase)),
    done
      ? h("small.muted", m.status.phase === "Completed" ? `took ${((m.status.total_time_ms || 0) / 1000).toFixed(1)} s, downtime ${m.status.downtime_ms ?? "?"} ms` : m.status.error || "")
      : [
          h("div.bar-track", h("div.bar-fill", { style: { width: `${pct.toFixed(1)}%` } })),
          h(
            "small.muted",
            `${pct.toFixed(0)}% · ${bytes(p.throughput_bytes_s)}/s · dirty ${bytes(p.dirty_rate_bytes_s)}/s · ETA ${p.eta_s ?? "?"} s · pass ${p.iteration || 0}`,
          ),
        ],
  );
}

function eventRows(events) {
  return table(
    [
      { title: "Time", cell: (e) => age(e.metadata.created_at) },
      { title: "Type", cell: (e) => h(`span.badge.${e.type === "Warning" ? "bad" : "ok"}`, e.type) },
      { title: "Object", cell: (e) => `${e.involved.kind}/${e.involved.name}` },
      { title: "Topic", cell: (e) => e.topic },
      { title: "Message", cell: (e) => e.message },
    ],
    events,
    { empty: "No events" },
  );
}

function overviewPage() {
  const nodesEl = h("div.cards");
  const phasesEl = h("div.phases");
  const migEl = h("div");
  const eventsEl = h("div");
  layout(
    "Overview",
    h("section", h("h2", "Nodes"), nodesEl),
    h("section", h("h2", "VMs by phase"), phasesEl),
    h("section", h("h2", "Active migrations"), migEl),
    h("section", h("h2", "Recent events"), eventsEl),
  );
  const vms = session.can("vms", "read") ? live("/v1/vms") : null;
  const nodes = session.can("nodes", "read") ? live("/v1/nodes") : null;
  const migs = session.can("migrations", "read") ? live("/v1/migrations") : null;
  const events = session.can("events", "read") ? live("/v1/events", RECENT) : null;
  follow([vms, nodes, migs, events].filter(Boolean), () => {
    const allVms = vms ? vms.values() : [];
    if (nodes) clear(nodesEl, nodes.values().map((n) => nodeCard(n, allocation(allVms))));
    const counts = {};
    for (const v of allVms) counts[v.status?.phase || "Pending"] = (counts[v.status?.phase || "Pending"] || 0) + 1;
    clear(
      phasesEl,
      Object.keys(counts).length ? Object.entries(counts).sort().map(([p, n]) => h("div.phase-count", { "data-phase": p }, phaseBadge(p), h("b", n))) : h("p.muted", "No VMs"),
    );
    if (migs) {
      const active = migs.values().filter((m) => !["Completed", "Failed", "Cancelled"].includes(m.status.phase));
      clear(migEl, active.length ? active.map(migrationProgress) : h("p.muted", "None"));
    }
    if (events) clear(eventsEl, eventRows(events.values().slice(-10).reverse()));
  });
}

// ------------------------------------------------------------ nodes

function nodesPage() {
  const list = h("div");
  layout("Nodes", list);
  const nodes = live("/v1/nodes");
  const vms = live("/v1/vms");
  follow([nodes, vms], () => {
    const alloc = allocation(vms.values());
    clear(
      list,
      table(
        [
          { title: "Name", cell: (n) => h("a", { href: `#/nodes/${n.metadata.name}` }, n.metadata.name) },
          { title: "Ready", cell: (n) => h(`span.badge.${n.status.ready ? "ok" : "bad"}`, n.status.ready ? "Ready" : "NotReady") },
          { title: "Schedulable", cell: (n) => (n.spec.schedulable ? "yes" : "cordoned") },
          { title: "VMs", cell: (n) => (alloc.get(n.metadata.name) || { vms: 0 }).vms },
          { title: "vCPU", cell: (n) => bar("", (alloc.get(n.metadata.name) || { vcpus: 0 }).vcpus, n.status.capacity.vcpus) },
          { title: "Memory", cell: (n) => bar("", (alloc.get(n.metadata.name) || { memory_mib: 0 }).memory_mib * 1048576, n.status.capacity.memory_mib * 1048576, bytes) },
          { title: "Heartbeat", cell: (n) => age(n.status.last_heartbeat) },
        ],
        nodes.values(),
      ),
    );
  });
}

function nodePage(name) {
  const body = h("div");
  layout(`Node ${name}`, body);
  const nodes = live("/v1/nodes");
  const vms = live("/v1/vms");
  const migs = live("/v1/migrations");
  const events = pageLive("/v1/events", `field_selector=involved.kind=node,involved.name=${encodeURIComponent(name)}`);
  const actions = h("div.actions");
  if (session.can("nodes", "update")) {
    actions.append(
      actionButton("Cordon", () => post(`/v1/nodes/${name}/cordon`)),
      actionButton("Uncordon", () => post(`/v1/nodes/${name}/uncordon`)),
      actionButton("Drain", () => drain(name, vms), { confirmText: `Cordon ${name} and move every VM off it?` }),
    );
  }
  follow([nodes, vms, migs, events], () => {
    const n = nodes.objects.get(name);
    if (!n) return clear(body, h("p.muted", "No such node (yet)"));
    const mine = vms.values().filter((v) => v.status?.node === name);
    const a = allocation(mine).get(name) || { vcpus: 0, memory_mib: 0 };
    const cap = n.status.capacity;
    const moving = migs.values().filter((m) => (m.status.source_node === name || m.status.target_node === name) && !["Completed", "Failed", "Cancelled"].includes(m.status.phase));
    clear(
      body,
      actions,
      h(
        "dl.facts",
        h("dt", "Ready"), h("dd", n.status.ready ? "yes" : `no: ${n.status.ready_reason || ""}`),
        h("dt", "Schedulable"), h("dd", n.spec.schedulable ? "yes" : "no (cordoned)"),
        h("dt", "Address"), h("dd", n.spec.address),
        h("dt", "Accelerator"), h("dd", n.status.accel),
        h("dt", "Agent"), h("dd", n.status.agent_version),
        h("dt", "Labels"), h("dd", Object.entries(n.metadata.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "-"),
        h("dt", "Last heartbeat"), h("dd", time(n.status.last_heartbeat)),
      ),
      h("h2", "Capacity"),
      bar("vCPU allocated", a.vcpus, cap.vcpus),
      bar("Memory allocated", a.memory_mib * 1048576, cap.memory_mib * 1048576, bytes),
      moving.length ? [h("h2", "Migrations"), moving.map(migrationProgress)] : null,
      h("h2", "VMs"),
      table(
        [
          { title: "Name", cell: (v) => h("a", { href: `#/vms/${v.metadata.name}` }, v.metadata.name) },
          { title: "Phase", cell: (v) => phaseBadge(v.status.phase) },
          { title: "vCPU", cell: (v) => v.spec.vcpus },
          { title: "Memory", cell: (v) => bytes(v.spec.memory_mib * 1048576) },
        ],
        mine,
      ),
      h("h2", "Events"),
      eventRows(events.values().slice(-20).reverse()),
    );
  });
}

/** Cordons the node, then asks for a live migration of each VM on it. */
async function drain(name, vms) {
  await post(`/v1/nodes/${name}/cordon`);
  const running = vms.values().filter((v) => v.status?.node === name && v.metadata.deletion_requested_at == null);
  let refused = 0;
  for (const v of running) {
    try {
      await post("/v1/migrations", { vm: v.metadata.name });
    } catch (e) {
      refused++;
      toast(`${v.metadata.name}: ${e.message}`, "error");
    }
  }
  toast(`Draining ${name}: ${running.length - refused} migration(s) started${refused ? `, ${refused} refused` : ""}`);
}

// ------------------------------------------------------------ migrations

function migrationsPage() {
  const list = h("div");
  layout("Migrations", list);
  const migs = live("/v1/migrations");
  follow([migs], () => {
    const all = migs.values().sort((a, b) => (a.metadata.created_at < b.metadata.created_at ? 1 : -1));
    clear(
      list,
      table(
        [
          { title: "Name", cell: (m) => m.metadata.name },
          { title: "Progress", cell: (m) => migrationProgress(m) },
          { title: "Strategy", cell: (m) => m.status.strategy || m.spec.strategy },
          { title: "Transport", cell: (m) => m.status.transport || "-" },
          { title: "Started", cell: (m) => age(m.status.started_at || m.metadata.created_at) },
          {
            title: "",
            cell: (m) =>
              session.can("migrations", "update") && !["Completed", "Failed", "Cancelled"].includes(m.status.phase)
                ? actionButton("Cancel", () => post(`/v1/migrations/${m.metadata.name}/cancel`), { cls: "danger" })
                : null,
          },
        ],
        all,
      ),
    );
  });
}

// ------------------------------------------------------------ events

function eventsPage() {
  const list = h("div");
  layout("Events", h("p.muted", "Since the dashboard was opened, and the hour before (newest first; `novacron events` lists all that are kept)"), list);
  const events = live("/v1/events", RECENT);
  follow([events], () => clear(list, eventRows(events.values().slice(-200).reverse())));
}

// ------------------------------------------------------------ other resources

/** A page listing `path` once (with a refresh button): kinds without a watch. */
function staticList(title, path, columns, { paged = true, pick = (d) => d } = {}) {
  const body = h("div");
  const load = async () => {
    try {
      const items = paged ? (await listAll(path)).items : pick(await get(path));
      clear(body, table(columns, items));
    } catch (e) {
      clear(body, h("p.error", e.message));
    }
  };
  layout(title, h("div.actions", actionButton("Refresh", load)), body);
  load();
}

/** A page following `path` live. */
function liveList(title, path, columns) {
  const body = h("div");
  layout(title, body);
  const col = live(path);
  follow([col], () => clear(body, table(columns, col.values())));
}

const name = { title: "Name", cell: (o) => o.metadata.name };
const project = { title: "Project", cell: (o) => o.metadata.project || "-" };
const created = { title: "Age", cell: (o) => age(o.metadata.created_at) };

const PAGES = {
  images: () => liveList("Images", "/v1/images", [name, project, { title: "Format", cell: (i) => i.spec?.format || "-" }, { title: "Phase", cell: (i) => phaseBadge(i.status?.phase) }, created]),
  networks: () => liveList("Networks", "/v1/networks", [name, project, { title: "Subnet", cell: (n) => n.spec.subnet }, created]),
  volumes: () => liveList("Volumes", "/v1/volumes", [name, project, { title: "Size", cell: (v) => bytes(v.spec.size_mib * 1048576) }, { title: "Phase", cell: (v) => phaseBadge(v.status?.phase) }, { title: "Attached to", cell: (v) => v.status?.attached_to || "-" }, created]),
  backups: () =>
    staticList("Backups", "/v1/backups", [
      { title: "Backup", cell: (b) => b.id },
      { title: "VM", cell: (b) => b.vm },
      { title: "Project", cell: (b) => b.project },
      { title: "Taken", cell: (b) => time(b.time) },
      { title: "Disks", cell: (b) => b.disks.map((d) => `${d.name} ${bytes(d.size_bytes)}`).join(", ") },
    ], { paged: false }),
  projects: () => staticList("Projects", "/v1/projects", [name, { title: "Quota", cell: (p) => JSON.stringify(p.quota || {}) }, { title: "Usage", cell: (p) => JSON.stringify(p.usage || {}) }]),
  users: () => staticList("Users", "/v1/users", [name, { title: "Roles", cell: (u) => (u.bindings || []).map((b) => `${b.role}@${b.project || "*"}`).join(", ") }, { title: "TOTP", cell: (u) => (u.totp_enabled ? "yes" : "no") }, created]),
  tokens: () => staticList("Tokens", "/v1/tokens", [name, { title: "User", cell: (t) => t.user || "-" }, { title: "Role", cell: (t) => t.role }, { title: "Project", cell: (t) => t.project || "*" }, { title: "Expires", cell: (t) => time(t.expires_at) }, { title: "Revoked", cell: (t) => (t.revoked_at ? time(t.revoked_at) : "-") }]),
  audit: () =>
    staticList("Audit", "/v1/audit", [
      { title: "Time", cell: (r) => time(r.entry?.time) },
      { title: "Actor", cell: (r) => r.entry?.actor },
      { title: "Request", cell: (r) => `${r.entry?.method} ${r.entry?.path}` },
      { title: "Status", cell: (r) => r.entry?.status },
    ]),
};

// ------------------------------------------------------------ router

async function render() {
  leavePage();
  const hash = location.hash || "#/";
  if (!session.me) {
    try {
      setSession(await get("/ui/session"));
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401) console.warn(e);
      return loginPage();
    }
  }
  if (hash === "#/login") {
    location.hash = "#/";
    return;
  }
  const [, page, arg, sub] = hash.split("/").map(decodeURIComponent);
  switch (page) {
    case "":
    case undefined:
      return overviewPage();
    case "nodes":
      return arg ? nodePage(arg) : nodesPage();
    case "vms":
      if (arg === "+new") return createVmPage({ layout, live, session });
      if (arg && sub === "console") return consolePage(arg, { layout, session });
      return arg ? vmPage(arg, { layout, live, pageLive, follow, session, migrationProgress, eventRows, onPage }) : vmsPage({ layout, live, follow, session });
    case "migrations":
      return migrationsPage();
    case "events":
      return eventsPage();
    default:
      if (PAGES[page]) return PAGES[page]();
      layout("Not found", h("p", `No page ${hash}`));
  }
}

window.addEventListener("hashchange", render);
render();
