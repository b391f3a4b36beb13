// VM pages: the list (virtualised rows, filters), a VM's page (facts,
// live charts, events, actions, migration with the scheduler's explanation
// and a predicted time), the create form and the serial console.

import { del, get, post } from "./api.js";
import { actionButton, age, bytes, clear, field, h, lineChart, phaseBadge, table, time, toast, virtualList } from "./views.js";

const FINAL = ["Completed", "Failed", "Cancelled"];

// ------------------------------------------------------------ list

function labelsText(o) {
  return Object.entries(o.metadata.labels || {})
    .map(([k, v]) => `${k}=${v}`)
    .join(", ");
}

/** `k=v`, `k!=v`, `k` terms, comma-separated, as the API's label selectors. */
function labelMatcher(text) {
  const terms = text
    .split(",")
    .map((t) => t.trim())
    .filter(Boolean)
    .map((t) => {
      const ne = t.indexOf("!=");
      if (ne > 0) return (l) => l[t.slice(0, ne)] !== t.slice(ne + 2);
      const eq = t.indexOf("=");
      if (eq > 0) return (l) => l[t.slice(0, eq)] === t.slice(eq + 1);
      return (l) => t in l;
    });
  return (labels) => terms.every((m) => m(labels || {}));
}

function options(select, values, all) {
  const keep = select.value;
  clear(select, h("option", { value: "" }, all), [...values].sort().map((v) => h("option", { value: v }, v)));
  select.value = [...values].includes(keep) ? keep : "";
}

export function vmsPage({ layout, live, follow, session }) {
  const search = h("input", { name: "search", placeholder: "name" });
  const project = h("select", { name: "project" });
  const node = h("select", { name: "node" });
  const phase = h("select", { name: "phase" });
  const labels = h("input", { name: "labels", placeholder: "labels: app=web,tier!=db" });
  const count = h("span.muted");
  const create = session.can("vms", "create") ? h("a", { href: "#/vms/+new" }, h("button.primary", { name: "create" }, "Create VM")) : null;
  const list = virtualList({
    header: h("div.vlist-head", ["Name", "Project", "Phase", "Node", "vCPU", "Memory", "Labels"].map((t) => h("div", t))),
    row: (v) =>
      h(
        "div.vrow",
        { "data-vm": v.metadata.name, onclick: () => (location.hash = `#/vms/${v.metadata.name}`) },
        h("div", h("a", { href: `#/vms/${v.metadata.name}` }, v.metadata.name)),
        h("div", v.metadata.project),
        h("div", phaseBadge(v.status?.phase)),
        h("div", v.status?.node || "-"),
        h("div", v.spec.vcpus),
        h("div", bytes(v.spec.memory_mib * 1048576)),
        h("div.muted", labelsText(v)),
      ),
  });
  layout("Virtual machines", h("div.filters", search, project, node, phase, labels, count, create), list.el);
  const vms = live("/v1/vms");
  const draw = () => {
    const all = vms.values();
    options(project, new Set(all.map((v) => v.metadata.project)), "all projects");
    options(node, new Set(all.map((v) => v.status?.node).filter(Boolean)), "all nodes");
    options(phase, new Set(all.map((v) => v.status?.phase || "Pending")), "all phases");
    const q = search.value.trim();
    const lm = labelMatcher(labels.value);
    const shown = all
      .filter(
        (v) =>
          (!q || v.metadata.name.includes(q)) &&
          (!project.value || v.metadata.project === project.value) &&
          (!node.value || v.status?.node === node.value) &&
          (!phase.value || (v.status?.phase || "Pending") === phase.value) &&
          lm(v.metadata.labels),
      )
      .sort((a, b) => (a.metadata.name < b.metadata.name ? -1 : 1));
    count.textContent = `${shown.length} of ${all.length}`;
    list.update(shown);
  };
  for (const el of [search, labels]) el.addEventListener("input", draw);
  for (const el of [project, node, phase]) el.addEventListener("change", draw);
  follow([vms], draw);
}

// ------------------------------------------------------------ one VM

function vmActions(v, session) {
  const name = v.metadata.name;
  const act = (what, body) => () => post(`/v1/vms/${name}/${what}`, body);
  const out = [];
  if (session.can("vms", "update")) {
    out.push(
      actionButton("Start", act("start")),
      actionButton("Stop", act("stop")),
      actionButton("Force stop", act("stop", { force: true }), { confirmText: `Kill ${name}'s QEMU at once?` }),
      actionButton("Reboot", act("reboot")),
      actionButton("Pause", act("pause")),
      actionButton("Resume", act("resume")),
    );
  }
  if (session.can("vms", "console")) out.push(h("a", { href: `#/vms/${name}/console` }, h("button", { name: "console" }, "Console")));
  if (session.can("migrations", "create")) out.push(h("button", { name: "migrate", onclick: () => migratePicker(name) }, "Migrate…"));
  if (session.can("vms", "delete"))
    out.push(
      actionButton(
        "Delete",
        async () => {
          await del(`/v1/vms/${name}`);
          location.hash = "#/vms";
        },
        { cls: "danger", confirmText: `Delete ${name} and its disks?` },
      ),
    );
  return out;
}

let pickerHost = null;

/** The scheduler's candidates for the VM, a target, its prediction, then go. */
async function migratePicker(name) {
  if (!pickerHost) return;
  clear(pickerHost, h("div.picker", h("p.muted", "Asking the scheduler…")));
  let explain;
  try {
    explain = await get(`/v1/vms/${name}/explain`);
  } catch (e) {
    return clear(pickerHost, h("div.picker", h("p.error", e.message)));
  }
  const target = h(
    "select",
    { name: "target" },
    h("option", { value: "" }, "scheduler's choice"),
    explain.candidates.map((c) => h("option", { value: c.node }, `${c.node} (score ${c.total.toFixed(2)})`)),
  );
  const prediction = h("div.prediction");
  const plan = async () => {
    clear(prediction, h("p.muted", "Predicting…"));
    try {
      const p = await post("/v1/migrations/plan", { vm: name, target_node: target.value || undefined });
      const pr = p.prediction;
      clear(
        prediction,
        h(
          "dl.facts",
          h("dt", "Route"), h("dd", `${p.source_node} → ${p.target_node} over ${p.transport}${p.transport_reason ? ` (${p.transport_reason})` : ""}`),
          h("dt", "Strategy"), h("dd", pr.strategy || "-"),
          h("dt", "Predicted time"), h("dd", `${pr.total_s.toFixed(1)} s`),
          h("dt", "Predicted downtime"), h("dd", `${pr.downtime_ms.toFixed(0)} ms`),
          h("dt", "On the wire"), h("dd", bytes(pr.wire_bytes)),
        ),
      );
    } catch (e) {
      clear(prediction, h("p.error", e.message));
    }
  };
  target.addEventListener("change", plan);
  const go = actionButton("Start migration", async () => {
    const m = await post("/v1/migrations", { vm: name, target_node: target.value || undefined });
    toast(`Migration ${m.metadata.name} started`);
    clear(pickerHost);
  });
  go.classList.add("primary");
  go.name = "start-migration";
  clear(
    pickerHost,
    h(
      "div.picker",
      h("h2", "Migrate"),
      h("p", explain.summary),
      table(
        [
          { title: "Candidate", cell: (c) => c.node },
          { title: "Score", cell: (c) => c.total.toFixed(3) },
          { title: "Packing", cell: (c) => c.packing.toFixed(2) },
          { title: "Headroom", cell: (c) => c.headroom.toFixed(2) },
          { title: "Affinity", cell: (c) => c.affinity.toFixed(2) },
        ],
        explain.candidates,
        { empty: "No node can take it" },
      ),
      explain.rejected.length ? h("p.muted", "Ruled out: ", explain.rejected.map((r) => `${r.nodes} × ${r.reason}`).join("; ")) : null,
      field("Target", target),
      prediction,
      h("div.actions", go, h("button", { onclick: () => clear(pickerHost) }, "Close")),
    ),
  );
  plan();
}

function disks(v) {
  const rows = [{ name: "root", size: v.spec.disk_mib ? bytes(v.spec.disk_mib * 1048576) : "image size", what: `image ${v.spec.image}${v.spec.full_copy ? " (full copy)" : ""}` }];
  if (v.spec.data_disk_mib) rows.push({ name: "data", size: bytes(v.spec.data_disk_mib * 1048576), what: "blank data disk" });
  for (const a of v.spec.volumes || []) rows.push({ name: `vol${a.slot}`, size: bytes(a.size_mib * 1048576), what: `volume ${a.volume}` });
  return table(
    [
      { title: "Disk", cell: (d) => d.name },
      { title: "Size", cell: (d) => d.size },
      { title: "What", cell: (d) => d.what },
    ],
    rows,
  );
}

function nics(v) {
  const plugged = new Map((v.status?.nics || []).map((n) => [n.slot, n]));
  return table(
    [
      { title: "NIC", cell: (n) => `nic${n.slot ?? "?"}` },
      { title: "Network", cell: (n) => n.network },
      { title: "Address", cell: (n) => n.ip || "-" },
      { title: "MAC", cell: (n) => n.mac || "-" },
      { title: "Plugged", cell: (n) => (plugged.has(n.slot) ? "yes" : "no") },
    ],
    v.spec.nics || [],
    { empty: "No NICs" },
  );
}

/** The VM's snapshots (read when the page opens and after each change). */
function snapshots(name, session) {
  const el = h("div");
  const load = async () => {
    let list;
    try {
      list = await get(`/v1/vms/${name}/snapshots`);
    } catch (e) {
      return clear(el, h("p.muted", e.message));
    }
    const may = session.can("vms", "update");
    const take = may
      ? actionButton("Take snapshot", async () => {
          const snap = prompt("Snapshot name", `snap-${new Date().toISOString().slice(0, 19).replace(/[-:T]/g, "")}`);
          if (!snap) return;
          await post(`/v1/vms/${name}/snapshots`, { name: snap });
          await load();
        })
      : null;
    clear(
      el,
      h("div.actions", take, actionButton("Refresh", load)),
      table(
        [
          { title: "Snapshot", cell: (s) => s.name },
          { title: "Taken", cell: (s) => time(s.created_at) },
          { title: "Parent", cell: (s) => s.parent || "-" },
          { title: "Memory", cell: (s) => (s.taken_running ? "yes" : "no") },
          { title: "Description", cell: (s) => s.description || "" },
          {
            title: "",
            cell: (s) =>
              may
                ? h(
                    "div.actions",
                    actionButton("Revert", async () => {
                      await post(`/v1/vms/${name}/snapshots/${s.name}/revert`);
                      await load();
                    }, { confirmText: `Revert ${name} to ${s.name}?` }),
                    actionButton("Delete", async () => {
                      await del(`/v1/vms/${name}/snapshots/${s.name}`);
                      await load();
                    }, { cls: "danger", confirmText: `Delete snapshot ${s.name}?` }),
                  )
                : null,
          },
        ],
        list,
        { empty: "No snapshots" },
      ),
    );
  };
  load();
  return el;
}

export function vmPage(name, { layout, live, pageLive, follow, session, migrationProgress, eventRows, onPage }) {
  const head = h("div");
  pickerHost = h("div");
  const facts = h("div");
  const charts = h("div.charts");
  const migEl = h("div");
  const eventsEl = h("div");
  layout(`VM ${name}`, head, pickerHost, h("h2", "Live"), charts, facts, migEl, h("h2", "Snapshots"), snapshots(name, session), h("h2", "Events"), eventsEl);
  const vms = live("/v1/vms");
  const migs = session.can("migrations", "read") ? live("/v1/migrations") : null;
  const events = session.can("events", "read") ? pageLive("/v1/events", `field_selector=involved.kind=vm,involved.name=${encodeURIComponent(name)}`) : null;
  let shownActions = null;
  follow([vms, migs, events].filter(Boolean), () => {
    const v = vms.objects.get(name);
    if (!v) return clear(head, h("p.muted", vms.synced ? "No such VM" : "Loading…"));
    const key = `${v.status?.phase}`;
    if (shownActions !== key) {
      shownActions = key;
      clear(head, h("div.actions", phaseBadge(v.status?.phase), v.status?.reason ? h("span.muted", v.status.reason) : null), h("div.actions", vmActions(v, session)));
    }
    clear(
      facts,
      h("h2", "Spec and status"),
      h(
        "dl.facts",
        h("dt", "Project"), h("dd", v.metadata.project),
        h("dt", "Phase"), h("dd", { "data-field": "phase" }, v.status?.phase || "Pending"),
        h("dt", "Node"), h("dd", v.status?.node ? h("a", { href: `#/nodes/${v.status.node}` }, v.status.node) : "-"),
        h("dt", "vCPU / memory"), h("dd", `${v.spec.vcpus} / ${bytes(v.spec.memory_mib * 1048576)}`),
        h("dt", "Image"), h("dd", v.spec.image),
        h("dt", "Machine / CPU"), h("dd", `${v.spec.machine || "pc"} / ${v.spec.cpu_model || "default"} (${v.status?.accel || "-"})`),
        h("dt", "Run strategy"), h("dd", v.spec.run_strategy),
        h("dt", "Started"), h("dd", time(v.status?.started_at)),
        h("dt", "Restarts"), h("dd", v.status?.restarts ?? 0),
        h("dt", "Labels"), h("dd", labelsText(v) || "-"),
        h("dt", "Created"), h("dd", `${time(v.metadata.created_at)} (${age(v.metadata.created_at)} ago)`),
      ),
      h("h2", "Disks and volumes"),
      disks(v),
      h("h2", "NICs"),
      nics(v),
    );
    if (migs) {
      const mine = migs.values().filter((m) => m.spec.vm === name && !FINAL.includes(m.status.phase));
      clear(migEl, mine.length ? [h("h2", "Migration"), mine.map(migrationProgress)] : null);
    }
    if (events) clear(eventsEl, eventRows(events.values().slice(-30).reverse()));
  });
  // CPU and memory, sampled every 2 s while the page is open.
  const cpu = [];
  const mem = [];
  let last = null;
  const sample = async () => {
    try {
      const s = await get(`/v1/vms/${name}/stats`);
      const t = Date.now() / 1000;
      if (last && s.cpu_seconds >= last.cpu) cpu.push([t, (100 * (s.cpu_seconds - last.cpu)) / Math.max(0.1, t - last.t)]);
      last = { t, cpu: s.cpu_seconds };
      mem.push([t, s.resident_bytes]);
    } catch {
      last = null;
    }
    for (const a of [cpu, mem]) if (a.length > 90) a.shift();
    clear(charts, lineChart(cpu, { label: "CPU %", fmt: (x) => `${x.toFixed(0)}%` }), lineChart(mem, { label: "Resident memory", fmt: bytes }));
  };
  sample();
  const timer = setInterval(sample, 2000);
  onPage(() => clearInterval(timer));
}

// ------------------------------------------------------------ create

export function createVmPage({ layout, live, session }) {
  const name = h("input", { name: "name", required: true, pattern: "[a-z0-9]([a-z0-9\\-]{0,61}[a-z0-9])?" });
  const project = h("input", { name: "project", placeholder: session.me?.project || "default", value: session.me?.project || "" });
  const image = h("select", { name: "image" });
  const vcpus = h("input", { name: "vcpus", type: "number", min: 1, max: 64, value: 1 });
  const memory = h("input", { name: "memory", type: "number", min: 32, value: 256 });
  const disk = h("input", { name: "disk", type: "number", min: 1, placeholder: "image size" });
  const dataDisk = h("input", { name: "data-disk", type: "number", min: 1, placeholder: "none" });
  const networks = h("div.filters");
  const userData = h("textarea", { name: "user-data", placeholder: "#cloud-config …" });
  const sshKey = h("input", { name: "ssh-key", placeholder: "ssh-ed25519 AAAA… (disk images)" });
  const selector = h("input", { name: "node-selector", placeholder: "node labels: zone=a" });
  const priority = h("input", { name: "priority", type: "number", value: 0 });
  const start = h("input", { name: "start", type: "checkbox", checked: true });
  const error = h("p.error");
  const images = live("/v1/images");
  const nets = session.can("networks", "read") ? live("/v1/networks") : null;
  const fill = () => {
    const keep = image.value;
    clear(image, images.values().map((i) => h("option", { value: i.metadata.name }, `${i.metadata.name} (${i.spec.format})`)));
    if (keep) image.value = keep;
    if (nets && !networks.childElementCount)
      clear(networks, nets.values().map((n) => h("label", h("input", { type: "checkbox", value: n.metadata.name }), ` ${n.metadata.name} ${n.spec.subnet}`)));
  };
  images.subscribe(fill);
  nets?.subscribe(fill);
  const submit = async (e) => {
    e.preventDefault();
    error.textContent = "";
    const num = (el) => (el.value ? Number(el.value) : undefined);
    const nodeSelector = Object.fromEntries(
      selector.value
        .split(",")
        .map((t) => t.trim().split("="))
        .filter((kv) => kv.length === 2 && kv[0]),
    );
    const chosen = [...networks.querySelectorAll("input:checked")].map((i) => ({ network: i.value }));
    const spec = {
      image: image.value,
      vcpus: num(vcpus),
      memory_mib: num(memory),
      disk_mib: num(disk),
      data_disk_mib: num(dataDisk),
      power_state: start.checked ? "Running" : "Stopped",
      nics: chosen,
      placement: { node_selector: nodeSelector, priority: num(priority) || 0 },
    };
    if (userData.value.trim() || sshKey.value.trim())
      spec.cloud_init = { user_data: userData.value.trim() || undefined, ssh_authorized_keys: sshKey.value.trim() ? [sshKey.value.trim()] : [] };
    try {
      const vm = await post("/v1/vms", { name: name.value.trim(), project: project.value.trim() || undefined, spec });
      location.hash = `#/vms/${vm.metadata.name}`;
    } catch (err) {
      error.textContent = `${err.field ? err.field + ": " : ""}${err.message}`;
    }
  };
  layout(
    "Create a VM",
    h(
      "form.create",
      { onsubmit: submit },
      field("Name", name),
      field("Project", project),
      field("Image", image),
      field("vCPUs", vcpus),
      field("Memory (MiB)", memory),
      field("Root disk (MiB)", disk, "default: the image's size"),
      field("Data disk (MiB)", dataDisk),
      nets ? field("Networks", networks, "none: the project's default network, if it has one") : null,
      field("cloud-init user-data", userData, "disk images only"),
      field("SSH key", sshKey),
      field("Node selector", selector),
      field("Priority", priority),
      h("label", start, " start it"),
      h("div.actions", h("button.primary", { type: "submit", name: "submit" }, "Create")),
      error,
    ),
  );
}

// ------------------------------------------------------------ console

function loadXterm() {
  if (window.Terminal) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const css = h("link", { rel: "stylesheet", href: "/ui/vendor/xterm.css" });
    const js = h("script", { src: "/ui/vendor/xterm.js" });
    js.onload = resolve;
    js.onerror = () => reject(new Error("cannot load the terminal"));
    document.head.append(css, js);
  });
}

export async function consolePage(name, { layout }) {
  const host = h("div.term");
  const status = h("p.muted", "Connecting…");
  layout(`Console of ${name}`, h("div.actions", h("a", { href: `#/vms/${name}` }, "← back to the VM"), status), host);
  try {
    await loadXterm();
  } catch (e) {
    status.textContent = e.message;
    return;
  }
  const term = new window.Terminal({ convertEol: false, cursorBlink: true, fontSize: 14, scrollback: 5000 });
  term.open(host);
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/v1/vms/${encodeURIComponent(name)}/console`);
  ws.binaryType = "arraybuffer";
  const enc = new TextEncoder();
  ws.onopen = () => {
    status.textContent = "Connected: what you type goes to the guest's serial console.";
    term.focus();
  };
  ws.onmessage = (m) => term.write(typeof m.data === "string" ? m.data : new Uint8Array(m.data));
  ws.onclose = () => (status.textContent = "Disconnected");
  ws.onerror = () => (status.textContent = "The console could not be opened (is the VM running?)");
  term.onData((d) => ws.readyState === 1 && ws.send(enc.encode(d)));
  const leave = () => {
    ws.close();
    term.dispose();
    window.removeEventListener("hashchange", leave);
  };
  window.addEventListener("hashchange", leave);
}
