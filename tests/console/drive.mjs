// Drives the operators' console (/admin) in Debian's headless Chromium with Playwright
// (playwright-core, no bundled browser), for tests/tests/console_browser.rs. It signs in
// (first as a non-admin, who is refused), opens every page, bans and unbans a user and
// grants them credits, takes a screenshot of each page, and prints one JSON object of what
// the pages showed; the Rust test compares it with the API. Any failure exits 1.
//
// Env: CONSOLE_URL (the Worker's /admin), ADMIN_EMAIL, ADMIN_PASSWORD, USER_EMAIL,
// USER_PASSWORD, USER_ID (the user to ban), CALL_ID (a finished call with a transcript),
// SHOTS (a directory for the PNGs), CHROMIUM (default /usr/bin/chromium).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is required`);
    process.exit(2);
  }
  return v;
};
const url = env("CONSOLE_URL");
const shots = env("SHOTS");
const callId = env("CALL_ID");
const userId = env("USER_ID");
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

// A fresh profile; no background connections (this machine's network is closed).
const profile = mkdtempSync(join(tmpdir(), "cmb-console-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const seen = { problems: [], requests: [] };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20000);
  // Script errors, CSP violations and failed loads are all problems.
  page.on("console", (m) => {
    if (m.type() === "error") seen.problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => seen.problems.push(`pageerror: ${e.message}`));
  page.on("request", (r) => seen.requests.push(r.url()));

  const shot = (name) => page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
  const ready = (view) => page.waitForSelector(`#page[data-view="${view}"][aria-busy="false"]`);
  // The page has rendered this route (the console marks #page when a render is done).
  const shown = (hash) =>
    page.waitForFunction((h) => {
      const p = document.getElementById("page");
      return p.dataset.route === h && p.getAttribute("aria-busy") === "false";
    }, hash);
  const visit = async (hash, view) => {
    await page.evaluate((h) => { location.hash = h; }, hash);
    await shown(hash);
    await ready(view);
  };
  const rows = (table) =>
    page.$$eval(`table[data-table="${table}"] tbody tr`, (trs) =>
      trs.map((tr) => ({ id: tr.dataset.id, cells: [...tr.cells].map((td) => td.textContent.trim()) })));
  const text = (sel) => page.$eval(sel, (el) => el.textContent.trim());

  // A non-admin is refused and nothing of the console shows.
  await page.goto(url);
  await page.fill("#signin-email", env("USER_EMAIL"));
  await page.fill("#signin-password", env("USER_PASSWORD"));
  await page.click("#signin button[type=submit]");
  await page.waitForFunction(() => document.getElementById("status").dataset.kind === "error");
  seen.nonAdmin = {
    status: await text("#status"),
    navHidden: await page.$eval("#nav", (n) => n.hidden),
    token: await page.evaluate(() => sessionStorage.length),
  };
  await shot("signin");

  // The admin signs in and lands on the live calls.
  await page.fill("#signin-email", env("ADMIN_EMAIL"));
  await page.fill("#signin-password", env("ADMIN_PASSWORD"));
  await page.click("#signin button[type=submit]");
  await ready("live");
  seen.live = { rows: await rows("live") };
  await shot("live");
  // It refreshes by itself: a new render within the refresh interval.
  const firstUpdate = await text("#page p.muted");
  await page.waitForFunction((before) => {
    const p = document.querySelector('#page[data-view="live"] p.muted');
    return p && p.textContent.trim() !== before;
  }, firstUpdate, { timeout: 12000 });
  seen.live.refreshed = true;

  await visit("#/calls", "calls");
  seen.calls = { rows: await rows("calls") };
  await shot("calls");

  await visit(`#/calls/${callId}`, "calls-detail");
  seen.call = {
    title: await text("#page h1"),
    transcript: await page.$$eval('[data-list="transcript"] li .text', (els) => els.map((e) => e.textContent)),
    latencyBars: await page.$$eval('[data-chart="latency"] rect.bar.a', (els) => els.map((e) => Number(e.dataset.value))),
    costs: await rows("costs"),
    events: await rows("events"),
  };
  await shot("call");

  // Searched by the unique part of the email (a search is at most 48 characters).
  const unique = env("USER_EMAIL").split("@")[0].slice(-32);
  await visit("#/users", "users");
  await page.fill('form[role="search"] input[name="q"]', unique);
  await page.click('form[role="search"] button[type="submit"]');
  await shown(`#/users?q=${unique}`);
  seen.users = { query: unique, url: page.url(), rows: await rows("users") };
  await shot("users");

  await page.click(`table[data-table="users"] tr[data-id="${userId}"] a`);
  await ready("users-detail");
  const state = () => text('[data-field="state"]');
  const credits = async () => Number(await text('[data-field="credits"]'));
  seen.user = { before: { state: await state(), credits: await credits() } };
  await page.fill("#ban-reason", "console test: ban");
  await page.click('form[aria-labelledby="ban-title"] button[type=submit]');
  await page.waitForFunction(() => document.querySelector('[data-field="state"]')?.textContent === "banned");
  seen.user.banned = { state: await state(), audit: await rows("audit"), status: await text("#status") };
  await shot("user-banned");
  await page.fill("#ban-reason", "console test: unban");
  await page.click('form[aria-labelledby="ban-title"] button[type=submit]');
  await page.waitForFunction(() => document.querySelector('[data-field="state"]')?.textContent === "active");
  await page.fill("#credits-amount", "25");
  await page.fill("#credits-reason", "console test: goodwill");
  const before = seen.user.before.credits;
  await page.click('form[aria-labelledby="credits-title"] button[type=submit]');
  await page.waitForFunction((b) => Number(document.querySelector('[data-field="credits"]')?.textContent) === b + 25, before);
  seen.user.after = { state: await state(), credits: await credits(), audit: await rows("audit") };
  await shot("user");

  await visit("#/analytics", "analytics");
  seen.analytics = {
    from: await page.inputValue('input[name="from"]'),
    to: await page.inputValue('input[name="to"]'),
    tiles: await page.$$eval('[data-list="totals"] li', (lis) =>
      Object.fromEntries(lis.map((li) => [li.querySelector(".label").textContent, li.querySelector(".value").textContent]))),
    callsPerDay: await page.$$eval('[data-chart="calls-per-day"] rect.bar', (els) => els.map((e) => Number(e.dataset.value))),
    revenueBars: await page.$$eval('[data-chart="revenue-cost"] rect.bar.a', (els) => els.map((e) => Number(e.dataset.value))),
    costBars: await page.$$eval('[data-chart="revenue-cost"] rect.bar.b', (els) => els.map((e) => Number(e.dataset.value))),
    marginBars: await page.$$eval('[data-chart="margin"] rect.bar', (els) => els.map((e) => Number(e.dataset.value))),
  };
  await shot("analytics");

  await visit("#/events", "events");
  seen.events = { rows: await rows("events") };
  await shot("events");

  // Where the token is kept: this tab's sessionStorage, nothing else.
  seen.storage = await page.evaluate(() => ({
    session: Object.keys(sessionStorage),
    local: localStorage.length,
    cookies: document.cookie,
  }));
  seen.finalUrl = page.url();

  // Signing out forgets the token and shows the sign-in form again.
  await page.click("#signout");
  await page.waitForSelector("#signin:not([hidden])");
  seen.signedOut = { session: await page.evaluate(() => sessionStorage.length) };
} catch (e) {
  console.error(e.stack || String(e));
  console.error(JSON.stringify(seen));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
if (!process.exitCode) console.log(JSON.stringify(seen));
