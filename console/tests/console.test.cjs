// The console in a real browser (Debian's Chromium, driven by playwright-core) against a
// real `wasp serve`: log in, deploy from a spec with an error and then without, watch the
// endpoint become ready, invoke it, follow a job and a batch to the end, cancel and retry
// a job, change weights, stop and start, and check that a tenant sees only its own. It
// measures the first load's transfer and the list of 1,000 endpoints while it scrolls,
// and writes screenshots. Run by runtime/cli/tests/console.rs, which starts the server and
// passes what it made in the environment:
//   WASP_URL, WASP_OPERATOR_KEY, WASP_ADMIN_KEY, WASP_INVOKER_KEY (tenant acme),
//   WASP_OTHER_ENDPOINT (bravo's), WASP_MANY_TENANT (holds 1,000 endpoints),
//   WASP_LOGGING_ENDPOINT (acme's, answers /log by logging its body), WASP_CHAT_ENDPOINT (a generation endpoint of the default tenant), WASP_COMPONENT
//   (hello.wasm), WASP_SHOTS (screenshot directory), CHROMIUM.
'use strict';
const assert = require('assert/strict');
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const URL = env('WASP_URL');
const SHOTS = env('WASP_SHOTS');
const figures = {};
/** The page a failure is photographed from. */
let current = null;

async function main() {
  fs.mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    const page = await context.newPage();
    page.setDefaultTimeout(20000);
    const problems = [];
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => m.type() === 'error' && !/status of 4\d\d/.test(m.text()) && problems.push(`console: ${m.text()}`));

    current = page;
    await firstLoad(page);
    await login(page, 'wasp_not_a_key', false);
    await login(page, env('WASP_ADMIN_KEY'), true);
    await expectText(page, '.who', 'acme · admin');
    await deploy(page);
    await endpointPage(page);
    await jobs(page);
    await weights(page);
    await logs(page);
    await isolation(page);
    await invoker(page);
    await operatorList(page);
    await chat(page);
    await phone(browser);
    await accessible(browser);
    assert.deepEqual(problems, [], 'the page logged errors');
  } catch (e) {
    if (current) {
      await current.screenshot({ path: path.join(SHOTS, 'failure.png'), fullPage: true }).catch(() => {});
      console.error(`at ${current.url()}; screenshot in ${path.join(SHOTS, 'failure.png')}`);
    }
    throw e;
  } finally {
    await browser.close();
  }
  fs.writeFileSync(path.join(SHOTS, 'figures.json'), JSON.stringify(figures, null, 2));
  console.log(`console figures: ${JSON.stringify(figures)}`);
}

async function expectText(page, selector, text) {
  await page.locator(selector, { hasText: text }).first().waitFor();
}

/** The first load: every response's transferred size, under 300 KB compressed. */
async function firstLoad(page) {
  const sizes = [];
  page.on('requestfinished', async (request) => {
    const s = await request.sizes().catch(() => null);
    if (s) sizes.push(s.responseBodySize + s.responseHeadersSize);
  });
  const client = await page.context().newCDPSession(page);
  await client.send('Network.enable');
  let encoded = 0;
  client.on('Network.loadingFinished', (e) => {
    encoded += e.encodedDataLength;
  });
  await page.goto(`${URL}/ui/`);
  await page.getByLabel('API key').waitFor();
  await page.waitForLoadState('networkidle');
  figures.first_load_bytes = encoded;
  figures.first_load_requests = sizes.length;
  assert.ok(encoded > 10000, `the first load moved ${encoded} bytes: the console is not served`);
  assert.ok(encoded < 300 * 1024, `the first load moved ${encoded} bytes, over 300 KB`);
  await client.detach();
}

async function login(page, key, good) {
  await page.getByLabel('API key').fill(key);
  await page.getByRole('button', { name: 'Log in' }).click();
  if (good) {
    await page.getByRole('button', { name: 'Log out' }).waitFor();
  } else {
    await expectText(page, '[role=alert]', 'not valid');
    await page.screenshot({ path: path.join(SHOTS, 'login.png') });
  }
}

async function logout(page) {
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByLabel('API key').waitFor();
}

const SPEC = (extra) => `name = "hello"
description = "Deployed from the console"

[[versions]]
name = "v1"
processor = { component = "COMPONENT" }

[versions.scaling]
min_workers = ${extra.min}
max_workers = ${extra.max}
`;

/** Deploys a spec with an error (shown at its line), then the fixed one. */
async function deploy(page) {
  await page.getByRole('link', { name: 'Deploy', exact: true }).first().click();
  await page.getByLabel(/Component/).setInputFiles(env('WASP_COMPONENT'));
  await expectText(page, '[role=status]', 'Uploaded sha256:');
  const spec = page.getByLabel('Spec (TOML, or JSON)');
  const digest = (await spec.inputValue()).match(/sha256:[0-9a-f]{64}/);
  assert.ok(digest, 'the upload put the digest into the spec');
  await spec.fill(SPEC({ min: 3, max: 1 }).replace('COMPONENT', digest[0]));
  await page.getByRole('button', { name: 'Deploy', exact: true }).click();
  const error = page.locator('.field-error');
  await error.waitFor();
  const text = await error.innerText();
  assert.match(text, /versions\[0\]\.scaling\.min_workers/);
  assert.match(text, /line 9\b/, `the error names the field's line: ${text}`);
  // The field's line is selected in the spec.
  const selected = await spec.evaluate((el) => el.value.slice(el.selectionStart, el.selectionEnd));
  assert.equal(selected, 'min_workers = 3');
  assert.equal(await spec.getAttribute('aria-invalid'), 'true');
  await page.screenshot({ path: path.join(SHOTS, 'deploy-error.png') });

  await spec.fill(SPEC({ min: 1, max: 2 }).replace('COMPONENT', digest[0]));
  await page.getByRole('button', { name: 'Deploy', exact: true }).click();
  await expectText(page, '[role=status]', 'Deployed hello');
  // A second endpoint with two versions, for the weights.
  await spec.fill(`name = "split"
[[versions]]
name = "blue"
weight = 50
processor = { component = "${digest[0]}" }
[[versions]]
name = "green"
weight = 50
processor = { component = "${digest[0]}" }
`);
  await page.getByRole('button', { name: 'Deploy', exact: true }).click();
  await expectText(page, '[role=status]', 'Deployed split');
}

/** The endpoint becomes ready; the try-it panel invokes it; the plots show it. */
async function endpointPage(page) {
  await page.getByRole('link', { name: 'Endpoints', exact: true }).click();
  await page.getByRole('link', { name: 'hello', exact: true }).click();
  await page.locator('.bar .status', { hasText: 'ready' }).first().waitFor({ timeout: 30000 });
  const tryit = page.locator('.tryit');
  await tryit.getByLabel('Body').fill('{"name": "console"}');
  for (let i = 0; i < 5; i++) {
    await tryit.getByRole('button', { name: 'Send' }).click();
    await tryit.locator('.answer').waitFor();
    await tryit.getByRole('button', { name: 'Send' }).and(page.locator(':not([disabled])')).waitFor();
  }
  const answer = await tryit.locator('.answer').innerText();
  assert.match(answer, /^200/, answer);
  assert.match(answer, /console/);
  assert.match(answer, /\d+\.\d ms/);
  assert.match(answer, /version v1/);
  // The requests plot shows them once the server's interval closes.
  await page.waitForFunction(() => {
    const row = [...document.querySelectorAll('#plot-requests .visually-hidden tr')].find((r) => r.textContent.startsWith('v1'));
    return row && Number(row.dataset.peak) > 0;
  }, null, { timeout: 15000 });
  assert.ok(await page.locator('#plot-latency canvas').count() > 0, 'the latency plot is drawn');
  assert.ok(await page.locator('#plot-workers canvas').count() > 0, 'the workers plot is drawn');
  await page.screenshot({ path: path.join(SHOTS, 'endpoint.png'), fullPage: true });

  // Stop and start.
  await page.getByRole('button', { name: 'Stop' }).click();
  await page.locator('.bar .status', { hasText: 'stopped' }).first().waitFor();
  await page.getByRole('button', { name: 'Start' }).click();
  await page.locator('.bar .status', { hasText: 'ready' }).first().waitFor({ timeout: 30000 });
}

/** A job to the end; a batch to the end; a job cancelled while queued, then retried. */
async function jobs(page) {
  const panel = page.locator('section.jobs');
  await panel.getByLabel(/^Input/).fill('{"name": "job"}');
  await panel.getByRole('button', { name: 'Submit' }).click();
  const made = await panel.locator('[role=status]').innerText();
  const id = made.match(/Job (\S+) is IN_QUEUE/);
  assert.ok(id, made);
  await panel.locator(`tr[data-job="${id[1]}"][data-status="COMPLETED"]`).waitFor({ timeout: 30000 });

  await panel.getByLabel('A batch (JSONL)').check();
  await panel.getByLabel(/^Lines/).fill(Array.from({ length: 20 }, (_, i) => `{"name": "line${i}"}`).join('\n'));
  await panel.getByRole('button', { name: 'Submit' }).click();
  await expectText(panel, '[role=status]', 'lines.');
  const batch = panel.locator('li[data-batch][data-status="COMPLETED"]');
  await batch.waitFor({ timeout: 30000 });
  assert.match(await batch.innerText(), /20 done, 0 failed of 20/);
  assert.equal(await batch.locator('progress').getAttribute('value'), '20');

  // While stopped, a job waits: cancel it, retry it, start the endpoint, and it runs.
  await page.getByRole('button', { name: 'Stop' }).click();
  await page.locator('.bar .status', { hasText: 'stopped' }).first().waitFor();
  await panel.getByLabel('A job').check();
  await panel.getByLabel(/^Input/).fill('{"name": "waiting"}');
  await panel.getByRole('button', { name: 'Submit' }).click();
  const waiting = (await panel.locator('[role=status]').innerText()).match(/Job (\S+) is IN_QUEUE/)[1];
  const row = (status) => panel.locator(`tr[data-job="${waiting}"][data-status="${status}"]`);
  await row('IN_QUEUE').getByRole('button', { name: 'Cancel' }).click();
  await row('CANCELLED').getByRole('button', { name: 'Retry' }).click();
  await row('IN_QUEUE').waitFor();
  await page.screenshot({ path: path.join(SHOTS, 'jobs.png'), fullPage: true });
  await page.getByRole('button', { name: 'Start' }).click();
  await row('COMPLETED').waitFor({ timeout: 30000 });
}

/** The weight editor: a sum over 100 is refused at the field; 80/20 is saved. */
async function weights(page) {
  await page.goto(`${URL}/ui/#/endpoints/split`);
  const blue = page.getByLabel('Weight of blue, percent');
  const green = page.getByLabel('Weight of green, percent');
  await blue.fill('80');
  await green.fill('30');
  await expectText(page, '.warn', 'Weights sum to 110% (must be 100)');
  await page.getByRole('button', { name: 'Save weights' }).click();
  await expectText(page, '[role=alert]', 'versions[].weight');
  await green.fill('20');
  await page.getByRole('button', { name: 'Save weights' }).click();
  await expectText(page, '[role=status]', 'Saved.');
  await page.reload();
  await page.getByLabel('Weight of blue, percent').waitFor();
  await page.waitForFunction(() => document.querySelector('[aria-label="Weight of blue, percent"]').value === '80');
  assert.equal(await page.getByLabel('Weight of green, percent').inputValue(), '20');
}

/** Logs follow: a processor's log records appear as it writes them. */
async function logs(page) {
  await page.goto(`${URL}/ui/#/endpoints/${env('WASP_LOGGING_ENDPOINT')}`);
  const tryit = page.locator('.tryit');
  await tryit.getByLabel('Path below the invoke route').fill('/log');
  const box = page.getByLabel('Processor logs');
  for (const word of ['first', 'second']) {
    await tryit.getByLabel('Body').fill(word);
    await tryit.getByRole('button', { name: 'Send' }).click();
    await box.locator('.log', { hasText: `hostile says ${word}` }).waitFor();
  }
  assert.equal(await box.locator('.log-warn').count(), 2);
}

/** Acme's key sees neither bravo's endpoint in its list nor at its address. */
async function isolation(page) {
  const other = env('WASP_OTHER_ENDPOINT');
  await page.goto(`${URL}/ui/#/`);
  await page.locator('tr[data-endpoint="hello"]').waitFor();
  assert.equal(await page.locator(`tr[data-endpoint="${other}"]`).count(), 0);
  await page.screenshot({ path: path.join(SHOTS, 'endpoints.png') });
  await page.goto(`${URL}/ui/#/endpoints/${other}`);
  await expectText(page, '[role=alert]', 'no endpoint');
  await page.goto(`${URL}/ui/#/t/bravo/endpoints/${other}`);
  await expectText(page, '[role=alert]', '404');
}

/** An invoker key: no control-plane pages, and the try-it panel works. */
async function invoker(page) {
  await page.goto(`${URL}/ui/#/`);
  await logout(page);
  await login(page, env('WASP_INVOKER_KEY'), true);
  await expectText(page, '.who', 'acme · invoker');
  assert.equal(await page.getByRole('link', { name: 'Deploy' }).count(), 0);
  assert.equal(await page.getByRole('link', { name: 'Endpoints' }).count(), 0);
  await page.getByLabel('Endpoint').fill('hello');
  await page.getByLabel('Body').fill('{"name": "invoker"}');
  await page.getByRole('button', { name: 'Send' }).click();
  await expectText(page, '.answer', 'invoker');
  assert.match(await page.locator('.answer').innerText(), /^200/);
  await logout(page);
}

/** The operator sees every tenant's endpoints, 1,000 of them, and the list scrolls without jank. */
async function operatorList(page) {
  await login(page, env('WASP_OPERATOR_KEY'), true);
  const many = env('WASP_MANY_TENANT');
  const started = Date.now();
  await page.locator('.count', { hasText: /^\d+ of \d+$/ }).waitFor({ timeout: 30000 });
  figures.list_ready_ms = Date.now() - started;
  const count = await page.locator('.count').innerText();
  const total = Number(count.split(' of ')[1]);
  assert.ok(total >= 1000, count);
  assert.ok(await page.locator('td', { hasText: 'acme' }).count() > 0, 'acme rows in the operator list');
  assert.ok(await page.locator('td', { hasText: many }).count() > 0, `${many} rows in the operator list`);
  const rendered = await page.locator('table.endpoints tbody tr:not(.spacer)').count();
  assert.ok(rendered < 100, `${rendered} rows rendered for ${total}: not windowed`);
  // Scroll the whole list, a frame at a time, and time the frames and long tasks.
  const measured = await page.evaluate(async () => {
    const longest = [];
    const observer = new PerformanceObserver((list) => list.getEntries().forEach((e) => longest.push(e.duration)));
    observer.observe({ type: 'longtask', buffered: false });
    const scroller = document.querySelector('.scroller');
    const frames = [];
    let last = performance.now();
    while (scroller.scrollTop + scroller.clientHeight < scroller.scrollHeight - 1) {
      scroller.scrollTop += 600;
      await new Promise((r) => requestAnimationFrame(r));
      const now = performance.now();
      frames.push(now - last);
      last = now;
    }
    observer.disconnect();
    frames.sort((a, b) => a - b);
    const lastRow = [...document.querySelectorAll('table.endpoints tbody tr:not(.spacer)')].pop();
    return {
      frames: frames.length,
      p95_frame_ms: frames[Math.floor(frames.length * 0.95)] || 0,
      max_frame_ms: frames[frames.length - 1] || 0,
      long_tasks: longest.length,
      longest_task_ms: Math.max(0, ...longest),
      last_row: lastRow ? lastRow.getAttribute('aria-rowindex') : null,
    };
  });
  Object.assign(figures, { list_rows: total, list_rendered_rows: rendered, ...measured });
  assert.equal(Number(measured.last_row), total + 1, 'the last row is reached');
  assert.ok(measured.longest_task_ms < 200, `a long task of ${measured.longest_task_ms} ms while scrolling`);
  assert.ok(measured.p95_frame_ms < 100, `p95 frame ${measured.p95_frame_ms} ms while scrolling`);
  await page.locator('.scroller').evaluate((el) => { el.scrollTop = 0; });
  await page.screenshot({ path: path.join(SHOTS, 'operator-endpoints.png') });
  // An endpoint of another tenant, through the operator's list: its scaling events say
  // why it went to zero.
  await page.getByRole('link', { name: 'svc-0000', exact: true }).click();
  const event = page.locator('.events li', { hasText: '→ 0' }).first();
  await event.waitFor();
  assert.match(await event.innerText(), /v1 1 → 0/);
}

/** The try-it panel streams a chat completion; the generation plot follows. */
async function chat(page) {
  await page.goto(`${URL}/ui/#/endpoints/${env('WASP_CHAT_ENDPOINT')}`);
  const tryit = page.locator('.tryit');
  await tryit.getByLabel('Chat (streamed)').check();
  await tryit.getByLabel('Message').fill('Name three colours.');
  await tryit.getByRole('button', { name: 'Send' }).click();
  await tryit.locator('.answer', { hasText: 'first token' }).waitFor({ timeout: 60000 });
  await tryit.getByRole('button', { name: 'Send' }).and(page.locator(':not([disabled])')).waitFor({ timeout: 60000 });
  const answer = await tryit.locator('.answer').innerText();
  assert.match(answer, /^200/, answer);
  assert.doesNotMatch(answer, /streaming…/, answer);
  const text = await tryit.locator('.answer pre').innerText();
  assert.ok(text.trim().length > 0, 'the streamed answer has text');
  await page.locator('#plot-generation canvas').waitFor({ timeout: 15000 });
  await page.screenshot({ path: path.join(SHOTS, 'chat.png'), fullPage: true });
  // The README's picture: an endpoint's plots, as a laptop shows them.
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: path.join(SHOTS, 'console.png') });
}

/** axe-core finds no serious or critical accessibility problem (contrast included) on the main pages. */
async function accessible(browser) {
  // axe is injected as a script, which the console's own policy forbids: this context only.
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, bypassCSP: true });
  const page = await context.newPage();
  current = page;
  await page.goto(`${URL}/ui/`);
  const checked = {};
  const check = async (name) => {
    await page.addScriptTag({ path: require.resolve('axe-core/axe.min.js') });
    const result = await page.evaluate(async () => {
      const r = await window.axe.run(document, { resultTypes: ['violations'] });
      return r.violations
        .filter((v) => v.impact === 'serious' || v.impact === 'critical')
        .map((v) => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ')}`);
    });
    checked[name] = result.length;
    assert.deepEqual(result, [], `accessibility problems on ${name}`);
  };
  for (const scheme of ['light', 'dark']) {
    await page.emulateMedia({ colorScheme: scheme });
    await page.goto(`${URL}/ui/`);
    await page.reload();
    await page.getByLabel('API key').waitFor();
    await check(`login (${scheme})`);
    await login(page, env('WASP_ADMIN_KEY'), true);
    await page.locator('tr[data-endpoint="hello"]').waitFor();
    await check(`endpoints (${scheme})`);
    await page.goto(`${URL}/ui/#/endpoints/hello`);
    await page.locator('#plot-requests canvas').waitFor();
    await check(`endpoint (${scheme})`);
    await page.goto(`${URL}/ui/#/deploy`);
    await page.getByLabel('Spec (TOML, or JSON)').waitFor();
    await check(`deploy (${scheme})`);
    await page.goto(`${URL}/ui/#/jobs`);
    await page.locator('section.jobs').waitFor();
    await check(`jobs (${scheme})`);
    await logout(page);
  }
  figures.accessibility_pages_checked = Object.keys(checked).length;
  await context.close();
}

/** On a phone's screen the list and an endpoint's page fit its width. */
async function phone(browser) {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  const page = await context.newPage();
  current = page;
  await page.goto(`${URL}/ui/`);
  await login(page, env('WASP_ADMIN_KEY'), true);
  await page.locator('tr[data-endpoint="hello"]').waitFor();
  await page.getByRole('link', { name: 'hello', exact: true }).click();
  await page.locator('#plot-requests canvas').waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  const wide = await page.evaluate(() => [...document.querySelectorAll('main *')]
    .filter((el) => el.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
    .slice(0, 5).map((el) => `${el.tagName}.${el.className}`).join(', '));
  assert.ok(overflow <= 1, `the page is ${overflow}px wider than a phone: ${wide}`);
  await page.screenshot({ path: path.join(SHOTS, 'phone-endpoint.png') });
  // Keyboard: on a fresh load the skip link comes first and lands in the main region.
  await page.reload();
  await page.locator('#plot-requests canvas').waitFor();
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Skip to content');
  await page.keyboard.press('Enter');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'main');
  await context.close();
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
