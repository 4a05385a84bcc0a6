// Scenario (a): alice and bob in an encrypted room; each decrypts the
// other's message.
import { encryptedRoom, expectCiphertextOnServer, expectDecrypted, register, runScenario, say, sendText, startClient, stopAll } from "./lib.mjs";

await runScenario("two users exchange encrypted messages", async (baseUrl, bobUrl) => {
    const alice = await startClient(await register(baseUrl, "alice"));
    const bob = await startClient(await register(bobUrl, "bob"));
    const roomId = await encryptedRoom(alice, [bob]);
    say(`room ${roomId}: encrypted, alice and bob joined`);

    const fromAlice = "hello bob, from alice";
    const e1 = await sendText(alice, roomId, fromAlice);
    await expectDecrypted(bob, roomId, e1, fromAlice);
    await expectCiphertextOnServer(bob, roomId, e1, fromAlice);
    say("bob decrypted alice's message");

    const fromBob = "hello alice, from bob";
    const e2 = await sendText(bob, roomId, fromBob);
    await expectDecrypted(alice, roomId, e2, fromBob);
    await expectCiphertextOnServer(alice, roomId, e2, fromBob);
    say("alice decrypted bob's message");
    stopAll(alice, bob);
});
