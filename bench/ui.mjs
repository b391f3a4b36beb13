// The dashboard with 5,000 VMs in the store, in headless Chromium (Debian's
// package, driven by playwright-core from crates/novacron/tests/ui):
//  - first load: bytes transferred and time from navigation to the VM list
//    rendered (its count says all VMs are in and the first rows show);
//  - update latency: from an API write (a VM's status, as its agent
//    reports it) to its row changing on screen, for rows in view.
// Run by bench/ui.sh, which starts the server; writes a JSON line to stdout.
//   NC_URL, NC_TOKEN, NC_VMS (default 5000), NC_UPDATES (default 30)

// playwright-core as the browser tests install it (scripts/setup.sh).
const { chromium } = await import(new URL("../crates/novacron/tests/ui/node_modules/playwright-core/index.mjs", import.meta.url));

const base = process.env.NC_URL.replace(/\/$/, "");
const token = process.env.NC_TOKEN;
const vms = Number(process.env.NC_VMS || 5000);
const updates = Number(process.env.NC_UPDATES || 30);
const auth = { authorization: `Bearer ${token}`, "content-type": "application/json" };

// The server's CA is its own: this process talks to it over TLS without checking it.
process.env.NODE_TLS_REJECT_UNAUTHORIZED = "0";

async function api(method, path, body) {
  const r = await fetch(`${base}${path}`, { method, headers: auth, body: body ? JSON.stringify(body) : undefined });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

async function populate() {
  const name = (i) => `bench-${String(i).padStart(5, "0")}`;
  let next = 0;
  const worker = async () => {
    while (next < vms) {
      const i = next++;
      await api("POST", "/v1/vms", {
        name: name(i),
        labels: { app: ["web", "db", "cache", "batch"][i % 4], shard: String(i % 50) },
        spec: { image: "bench", vcpus: 1 + (i % 4), memory_mib: 128 * (1 + (i % 8)), power_state: "Stopped" },
      });
    }
  };
  const t = Date.now();
  await Promise.all(Array.from({ length: 8 }, worker));
  return (Date.now() - t) / 1000;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)];
};
const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
};

const populateS = await populate();
const browser = await chromium.launch({
  executablePath: process.env.NC_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});

/** One cold first load of the VM list: bytes on the wire and milliseconds. */
async function firstLoad() {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } });
  // The session cookie, set before the measured load (logging in is not part of it).
  const login = await ctx.request.post(`${base}/ui/session`, { data: { token } });
  if (!login.ok()) throw new Error(`log in: ${login.status()}`);
  const page = await ctx.newPage();
  const cdp = await ctx.newCDPSession(page);
  await cdp.send("Network.enable");
  await cdp.send("Network.setCacheDisabled", { cacheDisabled: true });
  const perRequest = new Map();
  cdp.on("Network.dataReceived", (e) => {
    const r = perRequest.get(e.requestId) || { chunks: 0, total: 0 };
    r.chunks += e.encodedDataLength;
    perRequest.set(e.requestId, r);
  });
  cdp.on("Network.loadingFinished", (e) => {
    const r = perRequest.get(e.requestId) || { chunks: 0, total: 0 };
    r.total = e.encodedDataLength;
    perRequest.set(e.requestId, r);
  });
  const started = Date.now();
  await page.goto(`${base}/ui/#/vms`);
  await page.waitForFunction(
    (n) => document.querySelector(".filters .muted")?.textContent === `${n} of ${n}` && document.querySelectorAll(".vrow").length > 0,
    vms,
    { timeout: 60_000, polling: "raf" },
  );
  const ms = Date.now() - started;
  // Let the watch stream open; it is part of what the page costs.
  await page.waitForTimeout(500);
  let bytes = 0;
  for (const r of perRequest.values()) bytes += Math.max(r.chunks, r.total);
  return { page, ctx, ms, bytes };
}

const loads = [];
for (let i = 0; i < 3; i++) {
  const l = await firstLoad();
  loads.push(l);
  if (i < 2) await l.ctx.close();
}
const { page } = loads[2];

// Update latency: the page writes a visible VM's status (as its agent would)
// and times until its row shows the new phase.
const latencies = [];
const phases = ["Running", "Stopped"];
for (let i = 0; i < updates; i++) {
  const ms = await page.evaluate(async ({ i, phases }) => {
    const rows = [...document.querySelectorAll(".vrow")];
    const row = rows[i % Math.min(rows.length, 15)];
    const name = row.dataset.vm;
    const csrf = document.cookie.match(/nc_csrf=([^;]+)/)[1];
    const vm = await (await fetch(`/v1/vms/${name}`)).json();
    const want = vm.status.phase === phases[0] ? phases[1] : phases[0];
    vm.status.phase = want;
    const shows = () => document.querySelector(`.vrow[data-vm="${name}"] .badge`)?.textContent === want;
    const t0 = performance.now();
    const done = new Promise((resolve) => {
      const obs = new MutationObserver(() => {
        if (shows()) {
          obs.disconnect();
          resolve(performance.now() - t0);
        }
      });
      obs.observe(document.querySelector(".vlist-rows"), { subtree: true, childList: true, characterData: true });
    });
    const r = await fetch(`/v1/vms/${name}/status`, {
      method: "PUT",
      headers: { "content-type": "application/json", "x-novacron-csrf": csrf },
      body: JSON.stringify(vm),
    });
    if (!r.ok) throw new Error(`status write: ${r.status} ${await r.text()}`);
    return await Promise.race([done, new Promise((_, rej) => setTimeout(() => rej(new Error(`${name} never showed ${want}`)), 10_000))]);
  }, { i, phases });
  latencies.push(ms);
}
await browser.close();

console.log(
  JSON.stringify({
    vms,
    populate_s: populateS,
    first_load_ms: loads.map((l) => l.ms),
    first_load_bytes: loads.map((l) => l.bytes),
    update_ms_median: median(latencies),
    update_ms_p95: pct(latencies, 95),
    update_ms_max: Math.max(...latencies),
    updates: latencies.length,
  }),
);
