// mqtt.js (npm `mqtt`) publishing and receiving with MQTT 5.0 topic aliases, for
// node/tests/it/mqtt.rs.
// Usage: node mqttjs_alias.mjs <url> <app> <token> <client id> <topic> <count>
// Connects with Topic Alias Maximum 8 (so the node may send aliases) and autoAssignTopicAlias
// (so mqtt.js sends them: the topic and an alias first, then the alias and an empty topic),
// subscribes to <topic>, publishes <count> messages to it at QoS 1 and prints, flushed:
//   connack <reason code> alias-max <the CONNACK's Topic Alias Maximum>
//   send <topic as sent, "" when empty> alias <alias or ->
//   puback <reason code>
//   recv <topic as received> alias <alias or -> dup <0|1> expiry <Message Expiry Interval or ->
//   msg <topic after mqtt.js resolved the alias> <payload>
// Exits 0 once <count> messages arrived, 1 after 20 s.
import mqtt from "mqtt";

const [url, app, token, clientId, topic, count] = process.argv.slice(2);
const want = Number(count);
let got = 0;
const client = mqtt.connect(url, {
  username: app,
  password: token,
  clientId,
  clean: true,
  protocolVersion: 5,
  reconnectPeriod: 0,
  connectTimeout: 10_000,
  autoAssignTopicAlias: true,
  properties: { topicAliasMaximum: 8 },
});
const timer = setTimeout(() => {
  console.log(`timeout after ${got} of ${want}`);
  process.exit(1);
}, 20_000);
const alias = (p) => (p.properties && p.properties.topicAlias) || "-";
client.on("packetsend", (p) => {
  if (p.cmd === "publish") console.log(`send "${p.topic}" alias ${alias(p)}`);
});
client.on("packetreceive", (p) => {
  // Emitted before mqtt.js resolves an alias: the topic as it came on the wire.
  if (p.cmd === "publish") {
    const expiry = (p.properties && p.properties.messageExpiryInterval) ?? "-";
    console.log(`recv "${p.topic}" alias ${alias(p)} dup ${p.dup ? 1 : 0} expiry ${expiry}`);
  }
  if (p.cmd === "puback") console.log(`puback ${p.reasonCode ?? 0}`);
});
client.on("connect", (ack) => {
  const max = (ack.properties && ack.properties.topicAliasMaximum) ?? 0;
  console.log(`connack ${ack.reasonCode ?? 0} alias-max ${max}`);
  client.subscribe(topic, { qos: 1 }, async (err) => {
    if (err) {
      console.log(`suback error ${err.message}`);
      process.exit(1);
    }
    for (let i = 1; i <= want; i++) {
      await client.publishAsync(topic, `m${i}`, { qos: 1 });
    }
  });
});
client.on("message", (t, payload) => {
  got += 1;
  console.log(`msg ${t} ${payload.toString()}`);
  if (got >= want) {
    clearTimeout(timer);
    setTimeout(() => client.end(false, {}, () => process.exit(0)), 300);
  }
});
client.on("error", (e) => {
  console.log(`error ${e.message}`);
  process.exit(1);
});
