// Scenario (e), the whole recovery set-up a client such as Element makes:
// alice bootstraps cross-signing, then secret storage (a recovery key) with
// a new key backup in it. A fresh login of alice, her old device gone, is
// given only the recovery key: from secret storage it takes her
// cross-signing keys (and signs itself, which bob sees) and the backup key,
// restores the backup and decrypts the old messages.
import { decodeRecoveryKey } from "matrix-js-sdk/lib/crypto-api/index.js";
import {
    backedUpSessions, check, encryptedRoom, expectDecrypted, expectUndecryptable, http, login, passwordAuth, register,
    runScenario, say, sendText, startClient, stopAll, waitFor,
} from "./lib.mjs";

/** Crypto callbacks that answer secret-storage prompts with ``holder.key``. */
function secretStorageKeyFrom(holder) {
    return {
        getSecretStorageKey: async ({ keys }) => {
            if (!holder.key) return null;
            const keyId = Object.keys(keys)[0];
            return [keyId, holder.key];
        },
    };
}

async function accountData(client, type) {
    const { baseUrl, accessToken, userId } = client.creds;
    return http(baseUrl, "GET",
        `/_matrix/client/v3/user/${encodeURIComponent(userId)}/account_data/${encodeURIComponent(type)}`,
        { token: accessToken });
}

await runScenario("recovery key restores cross-signing and key backup on a fresh login", async (baseUrl, bobUrl) => {
    const aliceAccount = await register(baseUrl, "alice");
    const aliceKey = {};
    const alice = await startClient(aliceAccount, { cryptoCallbacks: secretStorageKeyFrom(aliceKey) });
    const bob = await startClient(await register(bobUrl, "bob"));
    const aliceId = alice.getUserId();
    const roomId = await encryptedRoom(alice, [bob]);

    await alice.getCrypto().bootstrapCrossSigning({ authUploadDeviceSigningKeys: passwordAuth(aliceAccount, []) });
    let recoveryKey;
    await alice.getCrypto().bootstrapSecretStorage({
        createSecretStorageKey: async () => {
            const generated = await alice.getCrypto().createRecoveryKeyFromPassphrase();
            aliceKey.key = generated.privateKey;
            recoveryKey = generated.encodedPrivateKey;
            return generated;
        },
        setupNewKeyBackup: true,
    });
    check(recoveryKey, "bootstrapping secret storage made no recovery key");
    check(await alice.getCrypto().isSecretStorageReady(), "alice's secret storage is not ready after bootstrap");
    const defaultKey = await accountData(alice, "m.secret_storage.default_key");
    check(defaultKey.status === 200 && defaultKey.body.key,
        `no m.secret_storage.default_key account data: HTTP ${defaultKey.status} ${JSON.stringify(defaultKey.body)}`);
    for (const type of ["m.cross_signing.master", "m.cross_signing.self_signing", "m.cross_signing.user_signing",
        "m.megolm_backup.v1"]) {
        const secret = await accountData(alice, type);
        check(secret.status === 200 && secret.body.encrypted?.[defaultKey.body.key]?.ciphertext,
            `secret ${type} is not in account data encrypted with key ${defaultKey.body.key}: ` +
            `HTTP ${secret.status} ${JSON.stringify(secret.body)}`);
    }
    const version = await waitFor("alice's client to back up to the new version", () =>
        alice.getCrypto().getActiveSessionBackupVersion());
    say(`alice set up cross-signing, secret storage (key ${defaultKey.body.key}) and key backup ${version}`);

    const fromAlice = "alice, before the recovery";
    const e1 = await sendText(alice, roomId, fromAlice);
    const fromBob = "bob, before the recovery";
    const e2 = await sendText(bob, roomId, fromBob);
    await expectDecrypted(alice, roomId, e2, fromBob);
    const ids = [e1, e2].map((id) => alice.getRoom(roomId).findEventById(id).getWireContent().session_id);
    await waitFor("both megolm sessions in alice's backup on the server", async () => {
        const s = await backedUpSessions(alice, version, roomId);
        return ids.every((id) => s[id]);
    });
    say("both room keys are in the backup");
    stopAll(alice);
    const logout = await http(baseUrl, "POST", "/_matrix/client/v3/logout", { token: alice.creds.accessToken, body: {} });
    check(logout.status === 200, `logout: HTTP ${logout.status} ${JSON.stringify(logout.body)}`);

    // The fresh login knows nothing but what the user types in: the recovery key.
    const freshKey = {};
    const fresh = await startClient(await login(aliceAccount, "alice recovered"),
        { cryptoCallbacks: secretStorageKeyFrom(freshKey) });
    const freshDevice = fresh.getDeviceId();
    await expectUndecryptable(fresh, roomId, [e1, e2]);
    check(!(await fresh.getCrypto().isCrossSigningReady()), "the fresh login is cross-signing ready before recovery");
    freshKey.key = decodeRecoveryKey(recoveryKey);

    // Cross-signing keys come out of secret storage; no new upload, no UIA.
    await fresh.getCrypto().bootstrapCrossSigning({
        authUploadDeviceSigningKeys: async () => {
            throw new Error("the fresh login tried to upload new cross-signing keys instead of using secret storage");
        },
    });
    check(await fresh.getCrypto().isCrossSigningReady(), "the fresh login is not cross-signing ready after recovery");
    // Its signature of the device goes up with /keys/signatures/upload and
    // comes back with the next key query.
    await waitFor("the fresh login's device to be cross-signed", async () => {
        const own = await fresh.getCrypto().getDeviceVerificationStatus(aliceId, freshDevice);
        return own && own.crossSigningVerified;
    }, { describe: async () => JSON.stringify(await fresh.getCrypto().getDeviceVerificationStatus(aliceId, freshDevice)) });
    say("the fresh login took alice's cross-signing keys from secret storage and signed itself");

    await fresh.getCrypto().loadSessionBackupPrivateKeyFromSecretStorage();
    const result = await fresh.getCrypto().restoreKeyBackup();
    check(result.imported >= 2, `restoring the backup imported ${result.imported} of ${result.total} keys, wanted 2`);
    await expectDecrypted(fresh, roomId, e1, fromAlice);
    await expectDecrypted(fresh, roomId, e2, fromBob);
    say(`the fresh login restored ${result.imported} keys and decrypted the old messages`);

    await waitFor(`bob's client to see alice's new device ${freshDevice} signed by her identity`, async () => {
        const s = await bob.getCrypto().getDeviceVerificationStatus(aliceId, freshDevice);
        return s && s.signedByOwner;
    }, { describe: async () => JSON.stringify(await bob.getCrypto().getDeviceVerificationStatus(aliceId, freshDevice)) });
    say("bob sees alice's recovered device signed by her identity");
    stopAll(fresh, bob);
});
