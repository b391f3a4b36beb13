// The dashboard in a real headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core; no browser is downloaded). Run by
// tests/dashboard.rs against a cluster it started:
//   NC_URL, NC_CA (unused: the cluster CA is not in Chromium's store, so
//   certificate errors are ignored for this origin only), NC_USER,
//   NC_PASSWORD, NC_VIEWER_TOKEN, NC_TARGET_NODE, NC_ARTIFACTS.
// Exits non-zero with the failed step; screenshots of every open page go
// to NC_ARTIFACTS on failure.

import { chromium } from "playwright-core";

const env = (k) => {
  if (!process.env[k]) throw new Error(`${k} is not set`);
  return process.env[k];
};
const base = env("NC_URL").replace(/\/$/, "");
const artifacts = env("NC_ARTIFACTS");
const BOOT_MS = 180_000;

const browser = await chromium.launch({
  executablePath: process.env.NC_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});
const pages = [];
const offsite = [];
let step = "start";

async function newPage() {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } });
  const page = await ctx.newPage();
  // Air-gapped: the dashboard asks nothing of any other origin.
  page.on("request", (r) => {
    if (!r.url().startsWith(base) && !r.url().startsWith("data:")) offsite.push(r.url());
  });
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  pages.push(page);
  return page;
}

async function check(name, fn) {
  step = name;
  const t = Date.now();
  await fn();
  console.log(`ok ${name} (${Date.now() - t} ms)`);
}

function expect(cond, what) {
  if (!cond) throw new Error(what);
}

try {
  const page = await newPage();

  await check("log in with user and password", async () => {
    await page.goto(`${base}/ui/`);
    await page.fill("input[name=user]", env("NC_USER"));
    await page.fill("input[name=password]", env("NC_PASSWORD"));
    await page.click("button[name=login]");
    await page.waitForSelector("nav.side");
    const cookies = await page.context().cookies();
    const session = cookies.find((c) => c.name === "nc_session");
    expect(session && session.httpOnly && session.sameSite === "Strict", `session cookie: ${JSON.stringify(session)}`);
    expect(!(await page.evaluate(() => document.cookie)).includes("nc_session"), "scripts can read the session cookie");
  });

  await check("create a VM from the form and see it reach Running without reloading", async () => {
    await page.click("a[href='#/vms']");
    await page.click("button[name=create]");
    await page.fill("input[name=name]", "ui-vm");
    await page.selectOption("select[name=image]", "demo");
    await page.fill("input[name=memory]", "128");
    await page.click("button[name=submit]");
    await page.waitForURL(/#\/vms\/ui-vm$/);
    let reloads = 0;
    page.on("load", () => reloads++);
    await page.waitForFunction(() => document.querySelector("[data-field=phase]")?.textContent === "Running", null, { timeout: BOOT_MS, polling: 200 });
    expect(reloads === 0, "the page reloaded");
    // Its events came live too.
    await page.waitForSelector("text=vm.running");
  });

  await check("the console runs a command and shows its output", async () => {
    await page.click("button[name=console]");
    await page.waitForSelector("text=Connected");
    await page.waitForSelector(".xterm-rows");
    await page.click(".term");
    // The guest may still be booting: type until its shell answers.
    const deadline = Date.now() + BOOT_MS;
    for (;;) {
      await page.keyboard.type("echo ui-$((6*7))\n");
      try {
        await page.waitForFunction(() => /ui-42/.test(document.querySelector(".xterm-rows")?.textContent || ""), null, { timeout: 5000 });
        break;
      } catch (e) {
        if (Date.now() > deadline) throw e;
      }
    }
  });

  await check("a migration started from the VM's page shows progress up to Completed", async () => {
    await page.goto(`${base}/ui/#/vms/ui-vm`);
    await page.waitForSelector("[data-field=phase]");
    await page.click("button[name=migrate]");
    await page.waitForSelector("select[name=target]");
    await page.selectOption("select[name=target]", env("NC_TARGET_NODE"));
    await page.waitForSelector("text=Predicted downtime", { timeout: 60_000 });
    await page.click("button[name=start-migration]");
    await page.click("a[href='#/migrations']");
    await page.waitForSelector("[data-migration]");
    await page.waitForFunction(
      () => [...document.querySelectorAll("[data-migration] .badge")].some((b) => b.textContent === "Completed"),
      null,
      { timeout: BOOT_MS, polling: 200 },
    );
    await page.goto(`${base}/ui/#/vms/ui-vm`);
    await page.waitForFunction((n) => document.querySelector("a[href='#/nodes/" + n + "']"), env("NC_TARGET_NODE"), { timeout: 30_000 });
  });

  await check("a snapshot taken from the VM's page is listed there", async () => {
    await page.goto(`${base}/ui/#/vms/ui-vm`);
    await page.waitForSelector("text=Take snapshot");
    page.once("dialog", (d) => d.accept("ui-snap"));
    await page.click("text=Take snapshot");
    await page.waitForSelector("td:text-is('ui-snap')", { timeout: 60_000 });
  });

  await check("a change without the CSRF header is refused", async () => {
    const status = await page.evaluate(async () => (await fetch("/v1/vms/ui-vm/pause", { method: "POST", credentials: "same-origin" })).status);
    expect(status === 403, `POST without the CSRF header answered ${status}`);
  });

  const viewer = await newPage();
  await check("a viewer sees no action buttons and a forced request is refused", async () => {
    await viewer.goto(`${base}/ui/`);
    await viewer.fill("input[name=token]", env("NC_VIEWER_TOKEN"));
    await viewer.click("button[name=login]");
    await viewer.waitForSelector("nav.side");
    await viewer.goto(`${base}/ui/#/vms/ui-vm`);
    await viewer.waitForFunction(() => document.querySelector("[data-field=phase]")?.textContent === "Running", null, { timeout: 30_000 });
    // Its snapshot is listed (a viewer reads them): wait for it, then
    // look for buttons that change anything (Refresh only reads again).
    await viewer.waitForSelector("td:text-is('ui-snap')", { timeout: 30_000 });
    const buttons = await viewer.$$eval("main button", (bs) => bs.map((b) => b.textContent).filter((t) => t !== "Refresh"));
    expect(buttons.length === 0, `a viewer sees buttons: ${buttons}`);
    expect(!(await viewer.$("button[name=create]")), "a viewer sees Create VM");
    const status = await viewer.evaluate(async () => {
      const csrf = document.cookie.match(/nc_csrf=([^;]+)/)[1];
      const r = await fetch("/v1/vms/ui-vm/stop", { method: "POST", headers: { "x-novacron-csrf": csrf }, credentials: "same-origin" });
      return r.status;
    });
    expect(status === 403, `a viewer's stop answered ${status}`);
  });

  await check("log out ends the session", async () => {
    await page.goto(`${base}/ui/#/`);
    await page.click("text=Log out");
    await page.waitForSelector("button[name=login]");
    const status = await page.evaluate(async () => (await fetch("/v1/vms")).status);
    expect(status === 401, `after log-out /v1/vms answered ${status}`);
  });

  expect(offsite.length === 0, `requests to other origins: ${offsite.join(", ")}`);
  console.log("all dashboard checks passed");
  await browser.close();
} catch (e) {
  console.log(`FAILED at "${step}": ${e.stack || e}`);
  let i = 0;
  for (const p of pages) {
    try {
      await p.screenshot({ path: `${artifacts}/page-${i++}.png`, fullPage: true });
    } catch {}
  }
  console.log(`screenshots in ${artifacts}`);
  await browser.close();
  process.exit(1);
}
