// Drives oxd's web console in headless Chromium (Debian's, through playwright-core),
// as an operator would: a wrong token is refused; the right one signs in; the volume
// is listed; a snapshot is taken and a clone of it made from the forms; the clone's
// hydration is watched while thickening (started from its button) fetches it whole.
// Prints one JSON object (what it saw) and leaves a screenshot.
//
// Usage: OX_PLAYWRIGHT=DIR node drive.mjs URL TOKEN SCREENSHOT  (DIR: the node_modules
// holding playwright-core)
import { createRequire } from "node:module";

const { chromium } = createRequire(process.env.OX_PLAYWRIGHT + "/")("playwright-core");

const [url, token, screenshot] = process.argv.slice(2);
const seen = { hydration: [] };

const browser = await chromium.launch({
  executablePath: process.env.OX_CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  // The console's certificate is the test's own, self-signed.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 1400 } });
  // No step has a time limit of its own (a slow machine is not a failure); the test
  // bounds the whole run.
  context.setDefaultTimeout(0);
  context.setDefaultNavigationTimeout(0);
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const failed = [];
  page.on("requestfailed", (r) => failed.push(r.url() + " " + (r.failure() || {}).errorText));
  seen.failed_requests = failed;
  const first = await page.goto(url);
  seen.csp = first.headers()["content-security-policy"];
  // The API refuses what is not a signed-in POST, from the page's own origin.
  seen.statuses = await page.evaluate(async (token) => {
    const post = (headers, body) => fetch("/api", { method: "POST", headers, body });
    const signed = { Authorization: "Bearer " + token };
    return {
      get: (await fetch("/api")).status,
      no_token: (await post({}, "{}")).status,
      bad_token: (await post({ Authorization: "Bearer nope" }, "{}")).status,
      unknown: (await fetch("/nothing-here")).status,
      not_json: await (await post(signed, "not json")).json().then((a) => a.error.code),
    };
  }, token);

  await page.fill("#token", "not-the-token-at-all");
  await page.click("#sign-in");
  await page.waitForFunction(() => document.getElementById("login-error").textContent.length > 0);
  seen.refused = await page.textContent("#login-error");

  await page.fill("#token", token);
  await page.click("#sign-in");
  await page.waitForSelector("#console:not([hidden])");
  seen.version = await page.textContent("#version");
  await page.waitForSelector("#volumes tbody tr");
  seen.volumes = await page.$$eval("#volumes tbody tr td:first-child", (tds) => tds.map((t) => t.textContent));

  // A snapshot from the form, then its job done.
  await page.click("#snapshot-form button");
  await page.waitForFunction(() =>
    [...document.querySelectorAll("#jobs tbody tr")].some((r) => r.cells[3].textContent === "done"),
    null);
  await page.waitForSelector("#clone-snapshot option", { state: "attached" });
  seen.snapshots = await page.$$eval("#snapshots tbody tr", (rows) => rows.length);

  // A clone of it, not thickened: nothing fetched yet.
  await page.fill("#clone-name", "web");
  await page.click("#clone-form button");
  const hydration = () => page.$eval("#clones tbody tr", (r) => r.querySelector("progress").value);
  await page.waitForSelector("#clones tbody tr progress");
  seen.hydration.push(await hydration());

  // Thickening from its button; hydration watched until whole.
  await page.click("#clones tbody tr button:text('thicken')");
  // Polled as the page refreshes, until whole (the test bounds the whole run).
  for (;;) {
    const h = await hydration();
    if (seen.hydration[seen.hydration.length - 1] !== h) seen.hydration.push(h);
    if (h >= 1) break;
    await page.waitForTimeout(250);
  }
  seen.clone_row = await page.$eval("#clones tbody tr", (r) => r.textContent);
  await page.screenshot({ path: screenshot, fullPage: true });
  seen.page_errors = errors;
} catch (e) {
  // What the page said, for the failure's report.
  const pages = browser.contexts().flatMap((c) => c.pages());
  for (const p of pages) {
    const said = await Promise.race([
      p.evaluate(() => ({
        login: document.getElementById("login-error").textContent,
        error: document.getElementById("error").textContent,
      })).catch(() => null),
      new Promise((done) => setTimeout(() => done("(the page did not answer)"), 10000)),
    ]);
    console.error("page:", JSON.stringify(said), "seen:", JSON.stringify(seen));
  }
  throw e;
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
