// Drives the Cinny web client in headless Chromium against a zhome, as two
// people would: A logs in, creates a room with the dialog's defaults
// (end-to-end encrypted), invites B; B logs in and accepts; A sends a
// message, reloads the page and must still read it; B must read it too.
//
// Usage: node cinny.mjs SCENARIO.json
// SCENARIO: {web, homeserver, out, message, room_name, chromium,
//            users: {a: {localpart, password, user_id}, b: {...}},
//            read_ms (optional: how long to wait for a message to be readable),
//            break_claim (optional: answer A's /keys/claim with no keys,
//            to show that the test notices undecryptable messages)}
// Prints one line of JSON on stdout: {"ok": true, ...} or
// {"ok": false, "step": ..., "error": ...}. On failure, screenshots and
// each page's console and network errors are saved in `out`.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { chromium } from 'playwright-core';

const scenario = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { web, homeserver, out, message, room_name: roomName } = scenario;
const { a: userA, b: userB } = scenario.users;

// Every wait is bounded; the whole run is bounded by the caller too.
const STEP_MS = 30_000;
const READ_MS = scenario.read_ms || 30_000;
const UTD = /unable to decrypt|decryption failed|waiting for (this )?message/i;

const logs = { A: [], B: [] };
const result = { ok: false, steps: [] };
let step = 'launch';

function note(who, line) {
  logs[who].push(`${new Date().toISOString()} ${line}`);
}

function watch(who, page) {
  page.on('console', (m) => note(who, `console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => note(who, `pageerror: ${e.message}`));
  page.on('requestfailed', (r) => note(who, `requestfailed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => {
    if (r.url().startsWith(homeserver) && r.status() >= 400) {
      note(who, `http ${r.status()}: ${r.request().method()} ${r.url().slice(homeserver.length)}`);
    }
  });
}

async function begin(name) {
  step = name;
  result.steps.push(name);
}

async function login(page, user) {
  await page.goto(`${web}/#/login/${encodeURIComponent(homeserver)}`, { timeout: STEP_MS });
  await page.locator('input[name=usernameInput]').fill(user.localpart, { timeout: STEP_MS });
  await page.locator('input[name=passwordInput]').fill(user.password, { timeout: STEP_MS });
  await page.keyboard.press('Enter');
  // The home view of a signed-in account with no rooms offers "Create Room".
  await page.getByText('Create Room').first().waitFor({ timeout: STEP_MS });
}

// The message must be on screen as plaintext, and nothing on the page may
// say that a message could not be decrypted.
async function expectReadable(page, who) {
  await page.getByText(message, { exact: true }).first().waitFor({ timeout: READ_MS });
  const body = await page.locator('body').innerText({ timeout: STEP_MS });
  const bad = body.match(UTD);
  if (bad) {
    throw new Error(`${who}'s page shows "${bad[0]}" next to the message`);
  }
}

// A timeline that shows an undecryptable event instead of the message:
// wait (bounded) for either, and fail with what was seen.
async function expectReadableOrExplain(page, who) {
  try {
    await expectReadable(page, who);
  } catch (e) {
    const body = await page.locator('body').innerText({ timeout: 5_000 }).catch(() => '');
    const bad = body.match(UTD);
    throw new Error(`${who} cannot read the message${bad ? ` (page shows "${bad[0]}")` : ''}: ${e.message}`);
  }
}

const browser = await chromium.launch({
  executablePath: scenario.chromium || '/usr/bin/chromium',
  args: ['--no-sandbox'],
  timeout: STEP_MS,
});
const pages = {};
try {
  const ctxA = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const ctxB = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  pages.A = await ctxA.newPage();
  pages.B = await ctxB.newPage();
  watch('A', pages.A);
  watch('B', pages.B);
  const pa = pages.A;
  const pb = pages.B;

  if (scenario.break_claim) {
    // Sabotage for the self-test: A's client is told that B's device has no
    // one-time keys, so A cannot start an Olm session and B never gets the
    // room key. The test must then fail.
    await pa.route('**/_matrix/client/*/keys/claim', (route) =>
      route.fulfill({ status: 200, contentType: 'application/json', body: '{"one_time_keys": {}, "failures": {}}' }));
  }

  await begin('A logs in');
  await login(pa, userA);

  await begin('A creates a room with the dialog defaults');
  await pa.getByText('Create Room').first().click({ timeout: STEP_MS });
  const form = pa.locator('form.create-room__form');
  await form.locator('input[name=name]').fill(roomName, { timeout: STEP_MS });
  const created = pa.waitForResponse(
    (r) => r.url().includes('/createRoom') && r.request().method() === 'POST', { timeout: STEP_MS });
  await form.locator('button[type=submit]').click({ timeout: STEP_MS });
  const createResp = await created;
  if (createResp.status() !== 200) {
    throw new Error(`createRoom answered ${createResp.status()}: ${await createResp.text()}`);
  }
  result.room_id = (await createResp.json()).room_id;
  result.create_request = createResp.request().postDataJSON();
  await pa.getByRole('button', { name: 'Invite Member' }).first().waitFor({ timeout: STEP_MS });

  await begin('B logs in');
  await login(pb, userB);

  await begin('A invites B');
  await pa.getByRole('button', { name: 'Invite Member' }).first().click({ timeout: STEP_MS });
  const modal = pa.locator('.ReactModalPortal');
  await modal.locator('form input.input').last().fill(userB.user_id, { timeout: STEP_MS });
  await modal.getByRole('button', { name: 'Search' }).click({ timeout: STEP_MS });
  const invited = pa.waitForResponse(
    (r) => r.url().includes('/invite') && r.request().method() === 'POST', { timeout: STEP_MS });
  await modal.getByRole('button', { name: 'Invite', exact: true }).click({ timeout: STEP_MS });
  const inviteResp = await invited;
  if (inviteResp.status() !== 200) {
    throw new Error(`invite answered ${inviteResp.status()}: ${await inviteResp.text()}`);
  }
  await modal.locator('button.ic-btn').first().click({ timeout: STEP_MS });
  await modal.locator('form').waitFor({ state: 'detached', timeout: STEP_MS });

  await begin('B accepts the invite');
  await pb.goto(`${web}/#/inbox/invites/`, { timeout: STEP_MS });
  await pb.getByText(roomName).first().waitFor({ timeout: STEP_MS });
  const joined = pb.waitForResponse(
    (r) => /\/(join|rooms\/[^/]+\/join)/.test(r.url()) && r.request().method() === 'POST', { timeout: STEP_MS });
  await pb.getByRole('button', { name: 'Accept' }).first().click({ timeout: STEP_MS });
  const joinResp = await joined;
  if (joinResp.status() !== 200) {
    throw new Error(`join answered ${joinResp.status()}: ${await joinResp.text()}`);
  }
  // A's client must know B is in the room before it encrypts (the member
  // list in A's room view shows B).
  await pa.getByText(`${userB.localpart} joined the room`).first().waitFor({ timeout: STEP_MS });

  await begin('A sends the message');
  const composer = pa.locator('[data-slate-editor="true"]');
  await composer.click({ timeout: STEP_MS });
  await pa.keyboard.type(message);
  const sent = pa.waitForResponse(
    (r) => r.url().includes('/send/') && r.request().method() === 'PUT', { timeout: STEP_MS });
  await pa.keyboard.press('Enter');
  const sendResp = await sent;
  result.send_url = sendResp.url().slice(homeserver.length);
  if (sendResp.status() !== 200) {
    throw new Error(`send answered ${sendResp.status()}: ${await sendResp.text()}`);
  }
  result.event_id = (await sendResp.json()).event_id;
  await expectReadableOrExplain(pa, 'A');

  await begin('A reloads the page and still reads the message');
  await pa.reload({ timeout: STEP_MS });
  await expectReadableOrExplain(pa, 'A after reload');

  await begin('B reads the message');
  await pb.getByText(roomName).first().click({ timeout: STEP_MS });
  await expectReadableOrExplain(pb, 'B');

  result.ok = true;
} catch (e) {
  result.ok = false;
  result.step = step;
  result.error = String(e && e.message ? e.message : e).split('\n').slice(0, 6).join('\n');
  for (const [who, page] of Object.entries(pages)) {
    await page.screenshot({ path: path.join(out, `cinny-${who}.png`), timeout: 10_000 }).catch(() => {});
  }
} finally {
  for (const who of Object.keys(logs)) {
    fs.writeFileSync(path.join(out, `cinny-${who}-console.log`), logs[who].join('\n') + '\n');
  }
  await browser.close().catch(() => {});
}
process.stdout.write(JSON.stringify(result) + '\n');
process.exit(result.ok ? 0 : 1);
