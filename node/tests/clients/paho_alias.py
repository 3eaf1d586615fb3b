"""Eclipse Paho (paho-mqtt, PyPI) sending a topic alias the node must refuse, for
node/tests/it/mqtt.rs.

MQTT 5.0 over TCP. After CONNACK it prints "connack <reason code> alias-max <Topic Alias Maximum>",
then publishes once, by --case:
  unknown  an empty topic with Topic Alias 5, which this connection never set (0x82 expected)
  above    the topic chat/x with Topic Alias --alias (above the maximum: 0x94 expected)
and prints "disconnect <reason code value>" when the node ends the connection.
Exit status 0 when a DISCONNECT from the node arrived within --timeout seconds, 1 otherwise.
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
    a.add_argument("--app", required=True)
    a.add_argument("--token", required=True)
    a.add_argument("--client-id", required=True)
    a.add_argument("--case", choices=["unknown", "above"], required=True)
    a.add_argument("--alias", type=int, default=33)
    a.add_argument("--timeout", type=float, default=20)
    args = a.parse_args()

    def out(line):
        print(line, flush=True)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(args.app, args.token)
    done = []

    def on_connect(client, userdata, flags, reason_code, properties):
        out(f"connack {reason_code.value} alias-max {getattr(properties, 'TopicAliasMaximum', 0)}")
        if reason_code.is_failure:
            return
        props = Properties(PacketTypes.PUBLISH)
        if args.case == "unknown":
            props.TopicAlias = 5
            client.publish("", b"to an alias never set", qos=0, properties=props)
        else:
            props.TopicAlias = args.alias
            client.publish("chat/x", b"alias above the maximum", qos=0, properties=props)

    def on_disconnect(client, userdata, flags, reason_code, properties):
        out(f"disconnect {reason_code.value}")
        done.append(reason_code.value)

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.connect(args.host, args.port, keepalive=30, clean_start=True)
    c.loop_start()
    deadline = time.time() + args.timeout
    while not done and time.time() < deadline:
        time.sleep(0.05)
    c.loop_stop()
    sys.exit(0 if done else 1)


if __name__ == "__main__":
    main()
