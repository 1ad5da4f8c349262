// Opens a page (file:// or http://) in Debian's headless chromium through playwright-core, the way a person
// would, and reports what they would see, as one JSON object on stdout: console errors and page errors,
// failed requests, the rows of `table.assets`, and a screenshot of the first 3D viewer once its model loaded.
//   node tools/browser_check.mjs <page> <screenshot.png> [timeout_ms]
import { chromium } from "playwright-core";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

const [page_, shot, timeoutArg] = process.argv.slice(2);
const timeout = Number(timeoutArg || 60000);
const url = /^[a-z]+:\/\//.test(page_) ? page_ : pathToFileURL(resolve(page_)).href;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
});  // headless, with a fresh temporary profile (playwright's own)
const result = { url, errors: [], failedRequests: [], rows: 0, viewers: 0, loaded: false, box: null };
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(timeout);
  page.on("console", (m) => { if (m.type() === "error") result.errors.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => result.errors.push(`page: ${e.message}`));
  page.on("requestfailed", (r) => result.failedRequests.push(`${r.url()}: ${r.failure()?.errorText}`));
  await page.goto(url, { waitUntil: "load", timeout });
  result.rows = await page.locator("table.assets > tbody > tr").count();
  result.viewers = await page.locator("model-viewer").count();
  if (result.viewers > 0) {
    const viewer = page.locator("model-viewer").first();
    await viewer.scrollIntoViewIfNeeded();
    const handle = await viewer.elementHandle();
    result.loaded = await page.waitForFunction((v) => v.loaded, handle, { timeout, polling: 250 })
      .then(() => true, (e) => `not loaded: ${e.message.split("\n")[0]}`);
    await page.waitForTimeout(1500); // a few frames after the load event
    result.box = await viewer.boundingBox();
    await viewer.screenshot({ path: shot });
  } else {
    await page.screenshot({ path: shot, fullPage: false });
  }
} catch (e) {
  result.errors.push(`driver: ${e.message}`);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
