"""Eclipse Paho (paho-mqtt, PyPI) connecting a persistent session, for node/tests/it/mqtt.rs.

Connects --client-id with Clean Start (5.0) / Clean Session (3.1.1) --clean and, in 5.0, Session
Expiry Interval --expiry, and prints "connack session-present=<True|False>". Then, if asked, it
subscribes to --subscribe (printing "suback"), and publishes "<--payload>" to --publish-topic
from a second connection (client id "<client-id>-pub"), without subscribing to it itself. Every
message the session receives for --wait seconds is printed as "msg <topic> <payload>". It ends
with a normal DISCONNECT. Exit status 0 when the CONNACK was a success, 1 otherwise.
"""

import argparse
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--version", choices=["5", "311"], default="5")
    a.add_argument("--app", required=True)
    a.add_argument("--token", required=True)
    a.add_argument("--client-id", required=True)
    a.add_argument("--clean", type=int, choices=[0, 1], required=True)
    a.add_argument("--expiry", type=int, default=0)
    a.add_argument("--subscribe")
    a.add_argument("--publish-topic")
    a.add_argument("--publish-token")
    a.add_argument("--payload", default="ping")
    a.add_argument("--wait", type=float, default=2.0)
    args = a.parse_args()

    def out(line):
        print(line, flush=True)

    v5 = args.version == "5"
    protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311

    def client(client_id, clean):
        if v5:
            return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        return mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, clean_session=bool(clean)
        )

    c = client(args.client_id, args.clean)
    c.username_pw_set(args.app, args.token)
    connected = []
    acked = set()

    def on_connect(client, userdata, flags, reason_code, properties):
        out(f"connack session-present={flags.session_present}")
        connected.append(not reason_code.is_failure)

    def on_message(client, userdata, msg):
        out(f"msg {msg.topic} {msg.payload.decode()}")

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        acked.add(mid)
        out("suback")

    c.on_connect = on_connect
    c.on_message = on_message
    c.on_subscribe = on_subscribe
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = args.expiry
        c.connect(args.host, args.port, keepalive=30, clean_start=bool(args.clean), properties=props)
    else:
        c.connect(args.host, args.port, keepalive=30)
    c.loop_start()
    deadline = time.time() + 10
    while not connected and time.time() < deadline:
        time.sleep(0.02)
    if not connected or not connected[0]:
        c.loop_stop()
        sys.exit(1)
    if args.subscribe:
        _, mid = c.subscribe(args.subscribe, qos=1)
        deadline = time.time() + 10
        while mid not in acked and time.time() < deadline:
            time.sleep(0.02)
    if args.publish_topic:
        p = client(args.client_id + "-pub", 1)
        p.username_pw_set(args.app, args.publish_token or args.token)
        p.connect(args.host, args.port, keepalive=30)
        p.loop_start()
        p.publish(args.publish_topic, args.payload.encode(), qos=1).wait_for_publish(10)
        p.disconnect()
        p.loop_stop()
    time.sleep(args.wait)
    c.disconnect()
    c.loop_stop()
    out("done")


if __name__ == "__main__":
    main()
