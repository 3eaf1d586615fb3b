"""Eclipse Paho (paho-mqtt, PyPI) as a Herald MQTT client, for node/tests/it/mqtt.rs.

Connects (TCP or WebSocket), subscribes to $herald/inbox at QoS 1 and prints one line per event,
flushed at once, until it has received --count messages or --timeout seconds passed:
  connack <reason code>
  suback <granted>
  msg <dup 0|1> <payload>
  expiry <seconds>      (its MQTT 5.0 Message Expiry Interval, when it has one)
  prop <name>=<value>   (each MQTT 5.0 user property of that message)
Exit status 0 when --count messages arrived, 1 otherwise.
"""

import argparse
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--transport", choices=["tcp", "websockets"], default="tcp")
    a.add_argument("--path", default="/mqtt")
    a.add_argument("--version", choices=["3", "5"], default="5")
    a.add_argument("--app", required=True)
    a.add_argument("--token", required=True)
    a.add_argument("--client-id", required=True)
    a.add_argument("--count", type=int, default=1)
    a.add_argument("--timeout", type=float, default=20)
    args = a.parse_args()

    def out(line):
        print(line, flush=True)

    proto = mqtt.MQTTv5 if args.version == "5" else mqtt.MQTTv311
    kw = {}
    if proto == mqtt.MQTTv311:
        kw["clean_session"] = False
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=proto,
        transport=args.transport,
        **kw,
    )
    if args.transport == "websockets":
        c.ws_set_options(path=args.path)
    c.username_pw_set(args.app, args.token)
    got = []

    def on_connect(client, userdata, flags, reason_code, properties):
        out(f"connack {reason_code}")
        if not reason_code.is_failure:
            client.subscribe("$herald/inbox", qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        out("suback " + ",".join(str(r) for r in reason_codes))

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        out(f"msg {int(msg.dup)} {msg.payload.decode(errors='replace')}")
        props = getattr(msg, "properties", None)
        expiry = getattr(props, "MessageExpiryInterval", None)
        if expiry is not None:
            out(f"expiry {expiry}")
        for k, v in getattr(props, "UserProperty", None) or []:
            out(f"prop {k}={v}")

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    if proto == mqtt.MQTTv5:
        c.connect(args.host, args.port, keepalive=30, clean_start=False)
    else:
        c.connect(args.host, args.port, keepalive=30)
    c.loop_start()
    deadline = time.time() + args.timeout
    while len(got) < args.count and time.time() < deadline:
        time.sleep(0.05)
    # Let the last PUBACK go out before disconnecting.
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()
    sys.exit(0 if len(got) >= args.count else 1)


if __name__ == "__main__":
    main()
