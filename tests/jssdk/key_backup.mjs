// Scenario (d): alice creates a server-side key backup, and her room keys
// (her own and the one bob shared with her) go into it. A fresh login of
// alice (new device, new store, her old device gone) cannot read the old
// messages until it restores the backup with the recovery key (the backup's
// decryption key as a user writes it down); then it decrypts them.
import { decodeRecoveryKey, encodeRecoveryKey } from "matrix-js-sdk/lib/crypto-api/index.js";
import { backedUpSessions, check, encryptedRoom, expectDecrypted, expectUndecryptable, http, login, register, runScenario, say, sendText, startClient, stopAll, waitFor } from "./lib.mjs";

const BACKUP_ALGORITHM = "m.megolm_backup.v1.curve25519-aes-sha2";

await runScenario("key backup restored by a fresh login decrypts old messages", async (baseUrl, bobUrl) => {
    const aliceAccount = await register(baseUrl, "alice");
    const alice = await startClient(aliceAccount);
    const bob = await startClient(await register(bobUrl, "bob"));
    const roomId = await encryptedRoom(alice, [bob]);

    await alice.getCrypto().resetKeyBackup();
    const version = await waitFor("alice's client to back up to the new version", () =>
        alice.getCrypto().getActiveSessionBackupVersion());
    const info = await http(baseUrl, "GET", "/_matrix/client/v3/room_keys/version", { token: alice.creds.accessToken });
    check(info.status === 200, `GET /room_keys/version: HTTP ${info.status} ${JSON.stringify(info.body)}`);
    check(info.body.version === version && info.body.algorithm === BACKUP_ALGORITHM && info.body.auth_data?.public_key,
        `the server's current backup is not the one alice made (${version}): ${JSON.stringify(info.body)}`);
    say(`alice created key backup version ${version}`);

    const fromAlice = "alice, before the backup is restored";
    const e1 = await sendText(alice, roomId, fromAlice);
    const fromBob = "bob, before the backup is restored";
    const e2 = await sendText(bob, roomId, fromBob);
    await expectDecrypted(alice, roomId, e2, fromBob);
    await expectDecrypted(bob, roomId, e1, fromAlice);
    const ids = [e1, e2].map((id) => alice.getRoom(roomId).findEventById(id).getWireContent().session_id);
    check(ids[0] !== ids[1], "alice and bob encrypted with the same megolm session");
    const sessions = await waitFor("both megolm sessions in alice's backup on the server", async () => {
        const s = await backedUpSessions(alice, version, roomId);
        return ids.every((id) => s[id]) ? s : null;
    }, { describe: async () => JSON.stringify(Object.keys(await backedUpSessions(alice, version, roomId))) });
    for (const id of ids) {
        const data = sessions[id].session_data;
        check(data && data.ciphertext && data.ephemeral && data.mac,
            `backed-up session ${id} is not curve25519-aes-sha2 encrypted: ${JSON.stringify(sessions[id])}`);
    }
    say("both room keys are in the backup, encrypted");

    const recoveryKey = encodeRecoveryKey(await alice.getCrypto().getSessionBackupPrivateKey());
    check(recoveryKey, "alice's client holds no backup decryption key");
    // Her old device is gone: no one can share the keys with the new one.
    stopAll(alice);
    const logout = await http(baseUrl, "POST", "/_matrix/client/v3/logout", { token: alice.creds.accessToken, body: {} });
    check(logout.status === 200, `logout: HTTP ${logout.status} ${JSON.stringify(logout.body)}`);

    const fresh = await startClient(await login(aliceAccount, "alice fresh login"));
    await expectUndecryptable(fresh, roomId, [e1, e2]);
    say("the fresh login sees the old messages and cannot decrypt them");

    const backupOnServer = await fresh.getCrypto().getKeyBackupInfo();
    check(backupOnServer && backupOnServer.version === version,
        `the fresh login sees backup ${JSON.stringify(backupOnServer)}, not version ${version}`);
    await fresh.getCrypto().storeSessionBackupPrivateKey(decodeRecoveryKey(recoveryKey), version);
    const result = await fresh.getCrypto().restoreKeyBackup();
    check(result.imported >= 2, `restoring the backup imported ${result.imported} of ${result.total} keys, wanted 2`);
    say(`the fresh login restored ${result.imported} of ${result.total} keys from the backup`);
    await expectDecrypted(fresh, roomId, e1, fromAlice);
    await expectDecrypted(fresh, roomId, e2, fromBob);
    say("the fresh login decrypted alice's and bob's old messages");
    stopAll(fresh, bob);
});
