// A tiny JSON-lines remote control for one headless Chromium page, used by tests/e2e/test_browser.py.
//
// Python writes one request per line on stdin: {"id": 1, "op": "goto", ...}; this script answers
// one line per request on stdout: {"id": 1, "ok": true, "value": ...} or {"id": 1, "ok": false,
// "error": "..."}. Everything else (browser console, page errors, failed requests) goes to stderr
// as JSON lines too, so the test can show it when something fails.
//
// The browser is Debian's Chromium (CHROMIUM, default /usr/bin/chromium), started by playwright-core
// with the flags this machine needs (no sandbox as root, no background networking: the network is
// closed). playwright-core never downloads a browser of its own. Each run gets a fresh, empty
// profile (playwright's launch() uses a new temporary --user-data-dir).
//
// Ops: launch, goto {url}, wait_for_function {expression, arg, timeout_ms}, evaluate {expression,
// arg}, fill {selector, value}, select {selector, value}, click {selector}, dialog_answers
// {answers} (for prompt()), screenshot {path}, close.
// `expression` is the source of a JavaScript function taking one argument.

import { createInterface } from "node:readline";
import { existsSync } from "node:fs";
import { chromium } from "playwright-core";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-dev-shm-usage",
  "--disable-background-networking",
  "--disable-component-update",
  "--no-first-run",
  "--disable-sync",
  "--disable-quic",
];

let browser = null;
let page = null;

function note(kind, detail) {
  process.stderr.write(JSON.stringify({ kind, ...detail }) + "\n");
}

function fn(source) {
  // eslint-disable-next-line no-new-func
  return new Function(`return (${source});`)();
}

const ops = {
  async launch() {
    if (!existsSync(executablePath)) {
      throw new Error(`${executablePath} does not exist: install Debian's chromium (apt-get install -y chromium)`);
    }
    browser = await chromium.launch({ executablePath, headless: true, args: CHROMIUM_ARGS, timeout: 30000 });
    const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
    page = await context.newPage();
    page.on("console", (m) => note("console", { type: m.type(), text: m.text() }));
    page.on("pageerror", (e) => note("pageerror", { text: String(e) }));
    page.on("requestfailed", (r) => note("requestfailed", { url: r.url(), error: r.failure()?.errorText }));
    page.on("response", (r) => { if (r.status() >= 400) note("http_error", { url: r.url(), status: r.status() }); });
    // Answer the page's prompt() dialogs (the Edit button) from a queue the test fills.
    page.on("dialog", async (d) => {
      const answer = dialogAnswers.shift();
      note("dialog", { message: d.message(), answer: answer ?? null });
      if (answer === undefined || answer === null) await d.dismiss();
      else await d.accept(answer);
    });
    return { version: browser.version() };
  },
  async goto({ url }) {
    const resp = await page.goto(url, { waitUntil: "load", timeout: 15000 });
    return { status: resp ? resp.status() : null };
  },
  async wait_for_function({ expression, arg = null, timeout_ms = 10000 }) {
    const handle = await page.waitForFunction(fn(expression), arg, { timeout: timeout_ms, polling: 50 });
    return await handle.jsonValue();
  },
  async evaluate({ expression, arg = null }) {
    return await page.evaluate(fn(expression), arg);
  },
  async fill({ selector, value }) {
    await page.fill(selector, value, { timeout: 5000 });
    return null;
  },
  async select({ selector, value }) {
    return await page.selectOption(selector, value, { timeout: 5000 });
  },
  async click({ selector }) {
    await page.click(selector, { timeout: 5000 });
    return null;
  },
  async dialog_answers({ answers }) {
    dialogAnswers.push(...answers);
    return null;
  },
  async screenshot({ path }) {
    await page.screenshot({ path, fullPage: true });
    return { path };
  },
  async close() {
    if (browser) await browser.close();
    browser = null;
    return null;
  },
};
const dialogAnswers = [];

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (!line.trim()) continue;
  let req;
  try {
    req = JSON.parse(line);
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: null, ok: false, error: `bad request: ${e}` }) + "\n");
    continue;
  }
  const op = ops[req.op];
  let reply;
  if (!op) reply = { id: req.id, ok: false, error: `unknown op ${req.op}` };
  else if (req.op !== "launch" && req.op !== "close" && !page) reply = { id: req.id, ok: false, error: "call launch first" };
  else {
    try {
      reply = { id: req.id, ok: true, value: (await op(req)) ?? null };
    } catch (e) {
      reply = { id: req.id, ok: false, error: String(e && e.stack ? e.stack : e) };
    }
  }
  if (req.op === "close") {
    // Exit at once: the readline interface would otherwise keep the process alive until stdin ends.
    process.stdout.write(JSON.stringify(reply) + "\n", () => process.exit(0));
    break;
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
if (browser) await browser.close();
