// Scenario (b): after alice and bob have talked in an encrypted room, bob
// logs in a second device; alice's next message reaches both of his
// devices and each decrypts it.
import { encryptedRoom, expectDecrypted, login, register, runScenario, say, sendText, startClient, stopAll, waitFor } from "./lib.mjs";

await runScenario("a second device logs in later and decrypts new messages", async (baseUrl, bobUrl) => {
    const alice = await startClient(await register(baseUrl, "alice"));
    const bobAccount = await register(bobUrl, "bob");
    const bob = await startClient(bobAccount);
    const roomId = await encryptedRoom(alice, [bob]);
    const before = "before bob's second device";
    const e1 = await sendText(alice, roomId, before);
    await expectDecrypted(bob, roomId, e1, before);
    say("bob's first device decrypted the first message");

    const bob2 = await startClient(await login(bobAccount, "bob second device"));
    if (bob2.getDeviceId() === bob.getDeviceId()) throw new Error("login gave the same device id again");
    say(`bob logged in a second device ${bob2.getDeviceId()}`);
    // Alice's client learns of the new device through the device-list
    // changes in her sync; wait until it has the device's keys so the next
    // room key is shared with it too.
    await waitFor(`alice to see bob's device ${bob2.getDeviceId()}`, async () => {
        const devices = await alice.getCrypto().getUserDeviceInfo([bob.getUserId()]);
        return devices.get(bob.getUserId())?.has(bob2.getDeviceId());
    });
    say("alice's client knows bob's second device");

    const after = "after bob's second device";
    const e2 = await sendText(alice, roomId, after);
    await expectDecrypted(bob2, roomId, e2, after);
    await expectDecrypted(bob, roomId, e2, after);
    say("both of bob's devices decrypted the new message");
    stopAll(alice, bob, bob2);
});
