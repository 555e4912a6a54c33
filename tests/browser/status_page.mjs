// Loads tokenproxy's admin status page in a real headless browser (Debian's
// chromium through playwright-core) and checks what the person paged at night
// relies on. Driven by tests/integration/browser.rs, which starts the dev IdP
// and the proxy with one healthy and one dead credential.
//
// Usage: node status_page.mjs ADMIN_URL HEALTHY DEAD SCREENSHOT_PATH
// Prints one JSON line with what it saw; exits 1 with the failed checks.
import { chromium } from "playwright-core";

const [url, healthy, dead, screenshot] = process.argv.slice(2);
if (!url || !healthy || !dead || !screenshot) {
  console.error("usage: node status_page.mjs ADMIN_URL HEALTHY DEAD SCREENSHOT_PATH");
  process.exit(64);
}

const failures = [];
const check = (ok, what) => {
  if (!ok) failures.push(what);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
const seen = {};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  const consoleErrors = [];
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  // Any request leaving the admin origin would be an external asset.
  const foreign = [];
  const origin = new URL(url).origin;
  page.on("request", (r) => {
    if (!r.url().startsWith(origin)) foreign.push(r.url());
  });

  const resp = await page.goto(url, { waitUntil: "load", timeout: 15000 });
  check(resp && resp.status() === 200, `status ${resp && resp.status()}`);
  check(
    (resp.headers()["content-security-policy"] || "").includes("default-src 'none'"),
    "a strict CSP header",
  );
  seen.title = await page.title();

  const row = (name) => page.locator(`tr[data-credential="${name}"]`);
  seen.healthyState = await row(healthy).getAttribute("data-state");
  seen.deadState = await row(dead).getAttribute("data-state");
  check(seen.healthyState === "fresh", `${healthy} is fresh (got ${seen.healthyState})`);
  check(seen.deadState === "dead", `${dead} is dead (got ${seen.deadState})`);

  const login = row(dead).getByRole("link", { name: "log in" });
  seen.loginLinks = await login.count();
  check(seen.loginLinks === 1, `one "log in" link on the dead row (got ${seen.loginLinks})`);
  if (seen.loginLinks === 1) {
    seen.loginHref = await login.getAttribute("href");
    check(seen.loginHref === `/login/${dead}`, `login href ${seen.loginHref}`);
  }
  seen.healthyLoginLinks = await row(healthy).getByRole("link").count();
  check(seen.healthyLoginLinks === 0, "no link on the healthy row");
  seen.deadError = (await row(dead).innerText()).replace(/\s+/g, " ");
  check(/invalid_grant/.test(seen.deadError), "the dead row shows its last error");
  seen.routes = await page.locator("tr[data-route]").count();
  check(seen.routes >= 2, `route rows (got ${seen.routes})`);

  // The countdown script ran (its nonce satisfied the CSP).
  const countdown = row(healthy).locator(".countdown");
  check((await countdown.count()) === 1, "a countdown on the healthy row");
  if ((await countdown.count()) === 1) {
    const first = await countdown.innerText();
    await page.waitForFunction(
      (prev) => document.querySelector(".countdown").textContent !== prev,
      first,
      { timeout: 4000 },
    ).catch(() => failures.push("the countdown ticks"));
    seen.countdown = [first, await countdown.innerText()];
  }

  await page.screenshot({ path: screenshot, fullPage: true });
  seen.screenshot = screenshot;
  seen.consoleErrors = consoleErrors;
  seen.foreignRequests = foreign;
  check(consoleErrors.length === 0, `no console errors (got ${JSON.stringify(consoleErrors)})`);
  check(foreign.length === 0, `no external assets (got ${JSON.stringify(foreign)})`);
} catch (e) {
  failures.push(`exception: ${e && e.stack ? e.stack : e}`);
} finally {
  await browser.close();
}

console.log(JSON.stringify({ ok: failures.length === 0, failures, seen }));
process.exit(failures.length === 0 ? 0 : 1);
