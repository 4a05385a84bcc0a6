// Shared helpers for the scenarios: accounts over plain HTTP, matrix-js-sdk
// clients with the Rust crypto (in-memory stores), bounded waits, and one
// way to fail (a message on stderr and a non-zero exit).

import { randomBytes } from "node:crypto";

const VERBOSE = process.env.JSSDK_VERBOSE === "1";
// The SDK and its Rust crypto log every request at debug level. Keep the
// output to what the scenario says, plus the SDK's last warnings and errors
// when it fails (JSSDK_VERBOSE=1 shows everything as it comes).
const sdkLog = [];
const SDK_LOG_LINES = 60;
if (!VERBOSE) {
    console.debug = () => {};
    console.info = () => {};
    console.log = () => {};
    // Noise on every run, whatever the server: not worth a line of the tail.
    const benign = /^\[MatrixRTCSessionManager\] Got room state event for unknown room|^Adding default global/;
    const keep = (level) => (...args) => {
        if (typeof args[0] === "string" && benign.test(args[0])) return;
        sdkLog.push(`[sdk ${level}] ${args.map((a) => (typeof a === "string" ? a : String(a))).join(" ")}`);
        if (sdkLog.length > SDK_LOG_LINES) sdkLog.shift();
    };
    console.warn = keep("warn");
    console.error = keep("error");
}

const sdk = await import("matrix-js-sdk");
const { UserId } = await import("@matrix-org/matrix-sdk-crypto-wasm");
export { sdk };

export const PASSWORD = "correct horse battery staple";
const POLL_MS = 100;

export function say(msg) {
    process.stdout.write(`${msg}\n`);
}

export class ScenarioError extends Error {}

export function check(cond, msg) {
    if (!cond) throw new ScenarioError(msg);
}

/** Run ``body(aliceUrl, bobUrl)`` as the whole script: exit 0 on success,
 * 1 with a clear message on failure or when ``limitMs`` passes. The command
 * line names alice's homeserver and, for users on a second server that
 * federates with it, bob's (by default the same one). */
export async function runScenario(name, body, limitMs = 50000) {
    const urls = process.argv.slice(2);
    if (urls.length < 1 || urls.length > 2 || !urls.every((u) => /^https?:\/\//.test(u))) {
        process.stderr.write(`usage: node ${process.argv[1]} HOMESERVER_BASE_URL [BOB_HOMESERVER_BASE_URL]\n`);
        process.exit(2);
    }
    const [aliceUrl, bobUrl] = [urls[0], urls[1] ?? urls[0]].map((u) => u.replace(/\/+$/, ""));
    const timer = setTimeout(() => {
        if (sdkLog.length) process.stderr.write(`last SDK warnings and errors:\n${sdkLog.join("\n")}\n`);
        process.stderr.write(`FAIL ${name}: scenario did not finish within ${limitMs} ms\n`);
        process.exit(1);
    }, limitMs);
    try {
        await body(aliceUrl, bobUrl);
    } catch (e) {
        const detail = e instanceof ScenarioError ? e.message : (e && e.stack) || String(e);
        const http = e && e.httpStatus ? ` (HTTP ${e.httpStatus} ${JSON.stringify(e.data)})` : "";
        if (sdkLog.length) process.stderr.write(`last SDK warnings and errors:\n${sdkLog.join("\n")}\n`);
        process.stderr.write(`FAIL ${name}: ${detail}${http}\n`);
        process.exit(1);
    }
    clearTimeout(timer);
    say(`PASS ${name}`);
    process.exit(0);
}

/** Poll ``probe`` until it returns something truthy; ``describe`` says what
 * was seen last when the wait times out. */
export async function waitFor(what, probe, { timeoutMs = 20000, describe } = {}) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
        const got = await probe();
        if (got) return got;
        if (Date.now() >= deadline) {
            const seen = describe ? `; last seen: ${await describe()}` : "";
            throw new ScenarioError(`timed out after ${timeoutMs} ms waiting for ${what}${seen}`);
        }
        await new Promise((r) => setTimeout(r, POLL_MS));
    }
}

// -- plain HTTP --------------------------------------------------------------

export async function http(baseUrl, method, path, { body, token } = {}) {
    const headers = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(baseUrl + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(20000),
    });
    const text = await res.text();
    let json;
    try {
        json = text ? JSON.parse(text) : undefined;
    } catch {
        json = text;
    }
    return { status: res.status, body: json };
}

/** A fresh user (random localpart, so scenarios can run again on one
 * server); the first device is the one registration logs in. */
export async function register(baseUrl, prefix) {
    const username = `${prefix}-${randomBytes(4).toString("hex")}`;
    const req = { username, password: PASSWORD, initial_device_display_name: `${prefix} first device` };
    let res = await http(baseUrl, "POST", "/_matrix/client/v3/register", {
        body: { ...req, auth: { type: "m.login.dummy" } },
    });
    if (res.status === 401 && res.body && res.body.session) {
        // A server that insists on a UIA session first: answer the stage it offered.
        res = await http(baseUrl, "POST", "/_matrix/client/v3/register", {
            body: { ...req, auth: { type: "m.login.dummy", session: res.body.session } },
        });
    }
    check(res.status === 200, `registering ${username}: HTTP ${res.status} ${JSON.stringify(res.body)}`);
    return { baseUrl, userId: res.body.user_id, deviceId: res.body.device_id, accessToken: res.body.access_token, username };
}

/** Another device of ``account`` by password login. */
export async function login(account, displayName) {
    const res = await http(account.baseUrl, "POST", "/_matrix/client/v3/login", {
        body: {
            type: "m.login.password",
            identifier: { type: "m.id.user", user: account.username },
            password: PASSWORD,
            initial_device_display_name: displayName,
        },
    });
    check(res.status === 200, `logging in ${account.userId}: HTTP ${res.status} ${JSON.stringify(res.body)}`);
    return { ...account, deviceId: res.body.device_id, accessToken: res.body.access_token };
}

// -- clients -----------------------------------------------------------------

/** A started matrix-js-sdk client for ``creds`` with a fresh in-memory Rust
 * crypto store, after its first sync. */
export async function startClient(creds, { cryptoCallbacks } = {}) {
    const client = sdk.createClient({
        baseUrl: creds.baseUrl,
        userId: creds.userId,
        deviceId: creds.deviceId,
        accessToken: creds.accessToken,
        cryptoCallbacks,
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const prepared = new Promise((resolve, reject) => {
        client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
            if (state === "PREPARED" || state === "SYNCING") resolve();
            else if (state === "ERROR") reject(new ScenarioError(`${creds.userId}: sync failed: ${data && data.error}`));
        });
    });
    await client.startClient({ initialSyncLimit: 50 });
    await Promise.race([
        prepared,
        new Promise((_r, reject) =>
            setTimeout(() => reject(new ScenarioError(`${creds.userId}: first sync did not finish in 20 s`)), 20000),
        ),
    ]);
    client.creds = creds;
    return client;
}

export function stopAll(...clients) {
    for (const c of clients) c.stopClient();
}

/** ``owner`` makes a private encrypted room (megolm) and invites
 * ``others``, who join; returns when everyone sees everyone joined and
 * encryption on. */
export async function encryptedRoom(owner, others) {
    const { room_id: roomId } = await owner.createRoom({
        preset: "private_chat",
        invite: others.map((c) => c.getUserId()),
        initial_state: [
            { type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } },
        ],
    });
    for (const c of others) {
        await waitFor(`${c.getUserId()} to see the invite to ${roomId}`, () => {
            const room = c.getRoom(roomId);
            return room && room.getMyMembership() === "invite";
        });
        await c.joinRoom(roomId);
    }
    const everyone = [owner, ...others];
    for (const c of everyone) {
        await waitFor(`${c.getUserId()} to see everyone joined to ${roomId} with encryption on`, async () => {
            const room = c.getRoom(roomId);
            if (!room) return false;
            for (const o of everyone) {
                if (room.getMember(o.getUserId())?.membership !== "join") return false;
            }
            return c.getCrypto().isEncryptionEnabledInRoom(roomId);
        });
    }
    return roomId;
}

export async function sendText(client, roomId, body) {
    const { event_id: eventId } = await client.sendTextMessage(roomId, body);
    check(eventId, `${client.getUserId()}: sending to ${roomId} gave no event_id`);
    return eventId;
}

function describeEvent(client, roomId, eventId) {
    const ev = client.getRoom(roomId)?.findEventById(eventId);
    if (!ev) return "event not in the client's timeline";
    return `type ${ev.getType()} (wire ${ev.getWireType()}), decryption failure: ${ev.isDecryptionFailure()}` +
        ` ${ev.decryptionFailureReason ?? ""}`;
}

/** Wait until ``client`` has event ``eventId`` in ``roomId`` decrypted to a
 * text message with ``body``; check it travelled encrypted. */
export async function expectDecrypted(client, roomId, eventId, body, timeoutMs = 20000) {
    const ev = await waitFor(
        `${client.getUserId()} (${client.getDeviceId()}) to decrypt ${eventId}`,
        async () => {
            const e = client.getRoom(roomId)?.findEventById(eventId);
            if (!e) return null;
            if (e.isBeingDecrypted()) await e.getDecryptionPromise();
            return e.getType() === "m.room.message" && !e.isDecryptionFailure() ? e : null;
        },
        { timeoutMs, describe: () => describeEvent(client, roomId, eventId) },
    );
    check(ev.isEncrypted() && ev.getWireType() === "m.room.encrypted",
        `${eventId} reached ${client.getUserId()} unencrypted (wire type ${ev.getWireType()})`);
    check(ev.getContent().body === body,
        `${client.getUserId()} decrypted ${eventId} to ${JSON.stringify(ev.getContent().body)}, sent ${JSON.stringify(body)}`);
    return ev;
}

/** The event as the server stores it: encrypted, no plaintext anywhere. */
export async function expectCiphertextOnServer(client, roomId, eventId, plaintext) {
    const { baseUrl, accessToken } = client.creds;
    const res = await http(baseUrl,
        "GET", `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/event/${encodeURIComponent(eventId)}`,
        { token: accessToken });
    check(res.status === 200, `GET event ${eventId}: HTTP ${res.status} ${JSON.stringify(res.body)}`);
    check(res.body.type === "m.room.encrypted", `server has ${eventId} as ${res.body.type}, not m.room.encrypted`);
    check(res.body.content.algorithm === "m.megolm.v1.aes-sha2", `${eventId} algorithm ${res.body.content.algorithm}`);
    check(!JSON.stringify(res.body).includes(plaintext), `the server's copy of ${eventId} contains the plaintext`);
}

/** The UIA callback: try without auth, and answer the password stage of
 * the session the server opened. */
export function passwordAuth(account, record) {
    return async (makeRequest) => {
        try {
            await makeRequest(null);
            record.push("accepted without auth");
            return;
        } catch (e) {
            if (e.httpStatus !== 401 || !e.data || !e.data.session) throw e;
            const flows = (e.data.flows || []).map((f) => f.stages.join(","));
            check(flows.some((f) => f === "m.login.password"),
                `device signing upload offered no m.login.password flow: ${JSON.stringify(e.data)}`);
            record.push("asked for UIA, answered with the password");
            await makeRequest({
                type: "m.login.password",
                identifier: { type: "m.id.user", user: account.username },
                password: PASSWORD,
                session: e.data.session,
            });
        }
    };
}

/** The sessions of ``roomId`` in backup ``version`` as the server holds them. */
export async function backedUpSessions(client, version, roomId) {
    const res = await http(client.creds.baseUrl, "GET",
        `/_matrix/client/v3/room_keys/keys?version=${encodeURIComponent(version)}`, { token: client.creds.accessToken });
    check(res.status === 200, `GET /room_keys/keys: HTTP ${res.status} ${JSON.stringify(res.body)}`);
    return res.body.rooms?.[roomId]?.sessions || {};
}

/** Wait until ``client`` has each of ``eventIds`` and has failed to decrypt
 * it (it holds no key for it). */
export async function expectUndecryptable(client, roomId, eventIds) {
    for (const id of eventIds) {
        await waitFor(`${client.getUserId()} (${client.getDeviceId()}) to have ${id} and fail to decrypt it`,
            async () => {
                const ev = client.getRoom(roomId)?.findEventById(id);
                if (!ev) return false;
                if (ev.isBeingDecrypted()) await ev.getDecryptionPromise();
                return ev.isDecryptionFailure();
            }, { describe: () => describeEvent(client, roomId, id) });
    }
}

/** The master public key ``client``'s crypto holds for ``userId`` (null if
 * none). The CryptoApi tells only whether some identity is known, not which,
 * so this asks the Rust OlmMachine behind it (not a public API of the SDK). */
export async function masterKeySeenBy(client, userId) {
    const machine = client.getCrypto().olmMachine;
    check(machine, "the client's crypto has no OlmMachine (not the Rust crypto?)");
    const identity = await machine.getIdentity(new UserId(userId));
    if (!identity || !identity.masterKey) return null;
    return Object.values(JSON.parse(identity.masterKey).keys)[0];
}
