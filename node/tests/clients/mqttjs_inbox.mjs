// mqtt.js (npm `mqtt`) as a Herald MQTT client, for node/tests/it/mqtt.rs.
// Usage: node mqttjs_inbox.mjs <url> <app> <token> <client id> <count> <protocol version 4|5>
// Connects with a persistent session, subscribes to $herald/inbox at QoS 1 and prints
// "msg <dup 0|1> <payload>" per message; exits 0 after <count> messages, 1 after 20 s.
import mqtt from "mqtt";

const [url, app, token, clientId, count, version] = process.argv.slice(2);
const want = Number(count);
let got = 0;
const client = mqtt.connect(url, {
  username: app,
  password: token,
  clientId,
  clean: false,
  protocolVersion: Number(version),
  reconnectPeriod: 0,
  connectTimeout: 10_000,
});
const timer = setTimeout(() => {
  console.log(`timeout after ${got} of ${want}`);
  process.exit(1);
}, 20_000);
client.on("connect", (ack) => {
  console.log(`connack ${ack.reasonCode ?? ack.returnCode ?? 0}`);
  client.subscribe("$herald/inbox", { qos: 1 }, (err, granted) => {
    console.log(`suback ${err ? err.message : granted.map((g) => g.qos).join(",")}`);
  });
});
client.on("message", (topic, payload, packet) => {
  got += 1;
  console.log(`msg ${packet.dup ? 1 : 0} ${payload.toString()}`);
  if (got >= want) {
    clearTimeout(timer);
    // end() sends the pending PUBACK first.
    setTimeout(() => client.end(false, {}, () => process.exit(0)), 300);
  }
});
client.on("error", (e) => {
  console.log(`error ${e.message}`);
  process.exit(1);
});
