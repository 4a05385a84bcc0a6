// Scenario (c): alice bootstraps cross-signing (the upload of her keys is
// authorised with her password through user-interactive auth); bob, who
// shares a room with her, sees her cross-signing identity and her device
// signed by it.
import { check, encryptedRoom, http, masterKeySeenBy, passwordAuth, register, runScenario, say, startClient, stopAll, waitFor } from "./lib.mjs";

await runScenario("cross-signing bootstrapped and visible to the other user", async (baseUrl, bobUrl) => {
    const aliceAccount = await register(baseUrl, "alice");
    const alice = await startClient(aliceAccount);
    const bob = await startClient(await register(bobUrl, "bob"));
    const aliceId = alice.getUserId();
    const aliceDevice = alice.getDeviceId();
    await encryptedRoom(alice, [bob]);
    // Bob tracks alice's devices from here on, before she has any
    // cross-signing keys: he must hear of the change through sync.
    const beforeDevices = await bob.getCrypto().getUserDeviceInfo([aliceId], true);
    check(beforeDevices.get(aliceId)?.has(aliceDevice), `bob does not see alice's device ${aliceDevice}`);
    check(!(await bob.getCrypto().userHasCrossSigningKeys(aliceId, true)), "bob sees cross-signing keys for alice before she made any");

    // The first upload may go without UIA (the spec allows it when the user
    // has no master key yet); replacing the keys must ask for it, and the
    // password answers.
    const uia = [];
    await alice.getCrypto().bootstrapCrossSigning({ authUploadDeviceSigningKeys: passwordAuth(aliceAccount, uia) });
    say(`alice bootstrapped cross-signing (${uia.join("; ")})`);
    check(await alice.getCrypto().isCrossSigningReady(), "alice's cross-signing is not ready after bootstrap");
    const firstMasterId = await alice.getCrypto().getCrossSigningKeyId("master");
    // Let her client finish the key queries that the first upload set off
    // (through her own device-list changes): the Rust crypto drops freshly
    // made private keys when a query sent before them answers after them.
    await waitFor("alice's client to see her device signed by her new self-signing key", async () => {
        const s = await alice.getCrypto().getDeviceVerificationStatus(aliceId, aliceDevice);
        return s && s.signedByOwner;
    });
    await new Promise((r) => setTimeout(r, 2000));
    const reset = [];
    await alice.getCrypto().bootstrapCrossSigning({
        setupNewCrossSigning: true, authUploadDeviceSigningKeys: passwordAuth(aliceAccount, reset),
    });
    check(reset.length === 1 && reset[0].startsWith("asked for UIA"),
        `replacing alice's cross-signing keys did not ask for user-interactive auth (${reset.join("; ")})`);
    say(`alice replaced her cross-signing keys (${reset.join("; ")})`);
    const masterId = await alice.getCrypto().getCrossSigningKeyId("master");
    check(masterId !== firstMasterId, "alice's master key did not change when she replaced it");
    const selfSigningId = await alice.getCrypto().getCrossSigningKeyId("self_signing");
    check(masterId && selfSigningId, `alice has no master (${masterId}) or self-signing (${selfSigningId}) key`);
    // The new self-signing key's signature of her device comes back with
    // the next query of her keys.
    await waitFor("alice's own device to be cross-signing verified with the new keys", async () => {
        const own = await alice.getCrypto().getDeviceVerificationStatus(aliceId, aliceDevice);
        return own && own.crossSigningVerified;
    }, { describe: async () => JSON.stringify(await alice.getCrypto().getDeviceVerificationStatus(aliceId, aliceDevice)) });

    // What bob's server hands him: over federation (alice on another
    // server) the replaced keys and the new device signature arrive a
    // little later, so ask until they are there.
    const problems = (body) => {
        const out = [];
        if (!Object.values(body.master_keys?.[aliceId]?.keys || {}).includes(masterId)) {
            out.push(`no master key ${masterId} for alice: ${JSON.stringify(body.master_keys)}`);
        }
        if (!Object.values(body.self_signing_keys?.[aliceId]?.keys || {}).includes(selfSigningId)) {
            out.push(`no self-signing key ${selfSigningId} for alice: ${JSON.stringify(body.self_signing_keys)}`);
        }
        if (body.user_signing_keys?.[aliceId] !== undefined) {
            out.push("alice's user-signing key is shown, which only she may see");
        }
        const deviceSigs = body.device_keys?.[aliceId]?.[aliceDevice]?.signatures?.[aliceId] || {};
        if (!Object.keys(deviceSigs).includes(`ed25519:${selfSigningId}`)) {
            out.push(`alice's device keys carry no signature by her self-signing key: ${JSON.stringify(deviceSigs)}`);
        }
        return out;
    };
    let lastQuery;
    await waitFor("bob's /keys/query to show alice's new cross-signing keys and her device signed", async () => {
        const q = await http(bobUrl, "POST", "/_matrix/client/v3/keys/query", {
            token: bob.creds.accessToken, body: { device_keys: { [aliceId]: [] } },
        });
        check(q.status === 200, `bob's /keys/query: HTTP ${q.status} ${JSON.stringify(q.body)}`);
        lastQuery = problems(q.body);
        return lastQuery.length === 0;
    }, { describe: () => lastQuery.join("; ") });
    say("bob's /keys/query shows alice's master and self-signing keys and her device signed");

    // And bob's client, told by sync that alice's keys changed, verifies it
    // all, with her new identity (her old one also signed her device).
    await waitFor("bob's client to learn alice's cross-signing identity", () =>
        bob.getCrypto().userHasCrossSigningKeys(aliceId));
    await waitFor(`bob's client to hold alice's new master key ${masterId}`, async () =>
        (await masterKeySeenBy(bob, aliceId)) === masterId,
    { describe: async () => `master key ${await masterKeySeenBy(bob, aliceId)}` });
    const status = await waitFor("bob's client to see alice's device signed by her identity", async () => {
        const s = await bob.getCrypto().getDeviceVerificationStatus(aliceId, aliceDevice);
        return s && s.signedByOwner ? s : null;
    }, { describe: async () => JSON.stringify(await bob.getCrypto().getDeviceVerificationStatus(aliceId, aliceDevice)) });
    const userStatus = await bob.getCrypto().getUserVerificationStatus(aliceId);
    check(!userStatus.isCrossSigningVerified(), "bob trusts alice's identity without having verified it");
    check(!status.crossSigningVerified, "bob trusts alice's device without having verified her");
    say("bob's client holds alice's new identity and sees her device signed by it (not yet verified by bob)");
    stopAll(alice, bob);
});
