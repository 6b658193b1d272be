// Drives the dashboard in headless Chromium for tests/dashboard.rs.
//
// One JSON command per stdin line, one JSON reply per stdout line. Waiting is
// always for a DOM condition with a timeout (never a sleep). Commands:
//   {"cmd":"open","url":...}                   load the page (fresh context)
//   {"cmd":"goto","route":"feed"}              follow a nav link (#/feed)
//   {"cmd":"wait","selector":...,"timeout_ms":N,"arm":bool,"state":"attached"|"detached"}
//        waits for the selector; with arm, replies {"armed":true} first, then
//        {"ok":true,"elapsed_ms":...} (measured from arming)
//   {"cmd":"rows"}                             the fleet table's rows, once loaded
//   {"cmd":"text","selector":...}              textContent of the first match
//   {"cmd":"count","selector":...}             how many elements match
//   {"cmd":"fill","selector":...,"value":...}  {"cmd":"click","selector":...}
//   {"cmd":"select","selector":...,"value":...}  (a <select>'s option)
//   {"cmd":"screenshot","path":...,"full":bool,"selector":...}  the full page (default),
//        the viewport (full false) or one element
//   {"cmd":"errors"}  {"cmd":"close"}
// Every reply has "ok"; a failure is {"ok":false,"error":...}.

import { createInterface } from "node:readline";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const executablePath = process.env.FLEETCARE_TEST_CHROMIUM || "/usr/bin/chromium";
const userDataDir = mkdtempSync(join(tmpdir(), "fleetcare-chromium-"));
const args = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath, args, headless: true, viewport: { width: 1280, height: 800 },
});
const page = context.pages()[0] || (await context.newPage());
const errors = [];
page.on("pageerror", (e) => errors.push("pageerror: " + e.message));
page.on("console", (m) => {
  // A refused request (a 401 the page handles) is logged by the browser itself.
  if (m.type() === "error" && !/status of 40[13]/.test(m.text())) errors.push("console: " + m.text());
});

const reply = (value) => process.stdout.write(JSON.stringify(value) + "\n");

async function rows() {
  // Loaded, and no query or page under way.
  await page.waitForSelector("#fleet-table:not([aria-busy]) table, #fleet-table:not([aria-busy]) p:not(:has-text('loading'))", { timeout: 10000 });
  return page.$$eval("#fleet-table tr[data-agent-id]", (trs) => trs.map((tr) => ({
    agent_id: tr.dataset.agentId,
    status: tr.dataset.status,
    labels: [...tr.querySelectorAll(".label")].map((l) => l.textContent),
  })));
}

async function handle(c) {
  switch (c.cmd) {
    case "open":
      await page.goto(c.url, { waitUntil: "load" });
      return { ok: true };
    case "goto":
      await page.click(`nav a[data-route="${c.route}"]`);
      await page.waitForFunction((r) => location.hash === "#/" + r, c.route);
      return { ok: true };
    case "wait": {
      const start = Date.now();
      const waiting = page.waitForSelector(c.selector, { timeout: c.timeout_ms || 10000, state: c.state || "attached" });
      if (c.arm) reply({ ok: true, armed: true });
      await waiting;
      return { ok: true, elapsed_ms: Date.now() - start };
    }
    case "rows":
      return { ok: true, rows: await rows() };
    case "count":
      return { ok: true, count: await page.locator(c.selector).count() };
    case "text":
      return { ok: true, text: await page.textContent(c.selector, { timeout: 10000 }) };
    case "fill":
      await page.fill(c.selector, c.value);
      return { ok: true };
    case "select":
      await page.selectOption(c.selector, c.value);
      return { ok: true };
    case "click":
      await page.click(c.selector, { timeout: 10000 });
      return { ok: true };
    case "screenshot":
      if (c.selector) await page.locator(c.selector).screenshot({ path: c.path });
      else await page.screenshot({ path: c.path, fullPage: c.full !== false });
      return { ok: true };
    case "errors":
      return { ok: true, errors };
    case "close":
      await context.close();
      rmSync(userDataDir, { recursive: true, force: true });
      reply({ ok: true });
      process.exit(0);
    default:
      throw new Error("unknown command " + c.cmd);
  }
}

reply({ ok: true, ready: true, version: context.browser()?.version() ?? "" });
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  try {
    reply(await handle(JSON.parse(line)));
  } catch (e) {
    reply({ ok: false, error: String(e && e.message ? e.message : e) });
  }
}
await context.close();
rmSync(userDataDir, { recursive: true, force: true });
